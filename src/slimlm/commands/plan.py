"""`slimlm plan MODEL --target edge|realtime|cloud` or explicit budgets (`--max-size 600MB --min-decode
40 --max-kl 0.05`): the mix of per-layer treatments (kept, RTN and GPTQ at int8 ... int2) with the
least predicted KL within the budgets, from measured per-layer sensitivity and, for speed budgets,
layer timings on this machine; prints the size / predicted-KL front, builds and measures the chosen
plan (predicted against measured), and writes the recipe, which `slimlm quantize --recipe` builds.
With `--search`, the allocation runs inside a successive-halving search over structure (blocks,
channels, heads), recovery and the method (rtn, gptq, awq, awq+gptq): `planner/search.py`."""

from __future__ import annotations

import argparse

from slimlm.commands._common import print_json, print_table, progress_bar, quiet_libraries
from slimlm.commands._flags import add_config_flags, settings_from_args


def plan_config():
    from slimlm.planner.plan import PlanConfig

    return PlanConfig


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face model folder, or 'demo'")
    p.add_argument("-o", "--recipe-out", default="plan.yaml", help="where the chosen recipe is written (YAML)")
    p.add_argument("--overwrite", action="store_true", help="replace --recipe-out (and --report) if they exist")
    p.add_argument("--sensitivity-out", default=None, help="also write the per-layer sensitivity (KL and bytes) as JSON")
    p.add_argument("--heatmap", default=None, help="also draw the sensitivity heat map (PNG; needs matplotlib)")
    p.add_argument("--report", default=None, help="also write one self-contained HTML report (front, heat map, "
                                                   "recipe, predicted against measured)")
    p.add_argument("--json", action="store_true")
    add_config_flags(p, [plan_config()])


def held_out_tokens(config, model: str, tokenizer, ids, used: int):
    """Token ids the check measures quality on (see PlanConfig.eval_data); from the calibration
    text, those after the windows (and after the slice a search scores)."""
    from slimlm.core.data import load_tokens
    from slimlm.core.model_io import DEMO, demo_path

    if config.eval_data:
        return load_tokens(config.eval_data, tokenizer, max_tokens=config.eval_tokens)
    if model == DEMO:
        return load_tokens(str(demo_path() / "heldout.txt"), tokenizer, max_tokens=config.eval_tokens)
    start = used + (config.slice_tokens if config.search else 0)
    rest = ids[start : start + config.eval_tokens]
    return rest if rest.numel() > 64 else None


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from pathlib import Path

    from slimlm.api import load
    from slimlm.core.errors import SlimError
    from slimlm.core.files import atomic_file
    from slimlm.core.recipe import dump_recipe
    from slimlm.planner.check import check_plan, summarize
    from slimlm.planner.plan import plan

    config = plan_config().from_dict(settings_from_args(args, plan_config()))
    budgets = config.budgets()
    out = Path(args.recipe_out).expanduser()
    for path in [out] + ([Path(args.report).expanduser()] if args.report else []):
        if path.exists() and not args.overwrite:
            raise SlimError(f"'{path}' already exists; pass --overwrite or choose another path")
        if not path.parent.is_dir():
            raise SlimError(f"parent folder of '{path}' does not exist; create it or choose another path")
    model, tokenizer = load(args.model)
    del model
    ids, tokens = config.windows_of(tokenizer)
    used = tokens.numel()
    held = held_out_tokens(config, args.model, tokenizer, ids, used) if config.verify else None
    gptq = dict(calib=config.calib, n_samples=config.n_samples, seq_len=config.seq_len)
    state = out.with_name(f".{out.name}.sensitivity.json")  # an interrupted or repeated run reuses it

    def loader():
        return load(args.model)[0]

    searched = None
    with progress_bar(not args.json) as update:
        verify = None
        if config.verify:
            def verify(recipe):
                return check_plan(loader, recipe, budgets, held, on_step=update, tokenizer=tokenizer)
        if config.search:
            from slimlm.planner.search import candidates, search

            searched = search(loader, tokenizer, ids, tokens, held, budgets,
                              candidates(config.structures, config.recover_steps, config.methods), gptq,
                              eta=config.eta, rungs=config.rungs, slice_tokens=config.slice_tokens,
                              method=config.method, fisher_samples=config.fisher_samples,
                              state=str(out.with_name(f".{out.name}.search.json")), on_step=update)
            result = searched.plan
        else:
            from slimlm.planner.plan import AWQ_SCALES

            result = plan(loader, tokens, calibration=ids, gptq=config.gptq, gptq_settings=gptq, budgets=budgets,
                          on_layer=lambda done, total: update("sensitivity", done, total), state=str(state),
                          method=config.method, fisher_samples=config.fisher_samples, verify=verify, on_step=update,
                          prefix=[dict(AWQ_SCALES, **gptq)] if config.awq else None, tokenizer=tokenizer)
    with atomic_file(out, args.overwrite) as tmp:
        tmp.write_text(dump_recipe(result.recipe))
    if args.sensitivity_out:
        import json

        with atomic_file(args.sensitivity_out, overwrite=True) as tmp:
            tmp.write_text(json.dumps(result.sensitivity.to_dict(), indent=1) + "\n")
    if args.heatmap:
        from slimlm.planner.heatmap import draw_heatmap

        with atomic_file(args.heatmap, overwrite=True) as tmp:
            draw_heatmap(result.sensitivity, tmp)
    if args.report:
        from slimlm.planner.report import write_report

        with atomic_file(args.report, args.overwrite) as tmp:
            write_report(result, tmp, title=f"slimlm plan {args.model}", budgets=budgets, searched=searched)
    summary = summarize(result, budgets)
    if args.json:
        extra = {} if searched is None else {"search": {"winner": searched.winner, "objective": searched.objective,
                                                        "history": searched.history, "trials": searched.trials}}
        print_json(dict(summary, recipe=str(out), treatments=result.treatments(), **extra,
                        front=[{"bytes": p.bytes, "predicted_kl": p.loss} for p in result.front.points]))
        return 0 if summary["met"] else 1
    if searched is not None:
        print_table(searched.rows(), title=f"search: {len(searched.history[0])} candidates, successive halving "
                                                 f"by {searched.objective} (last rung: held-out text)")
        print(f"winner: {searched.winner}")
    points = result.front.points
    print_table(result.front_rows(8), title=f"{args.model}: {len(points)} points on the size / predicted-KL front")
    counts: dict[str, int] = {}
    for t in result.treatments().values():
        counts[t] = counts.get(t, 0) + 1
    print(f"chosen: {result.point.bytes / 1e3:.1f} KB, predicted KL {summary['predicted_kl']:.4f}"
          + (f" (no choice within {budgets.max_bytes / 1e3:.1f} KB can do better than {summary['lower_bound']:.4f})"
             if summary.get("lower_bound") is not None else "")
          + f"; {', '.join(f'{n} {t}' for t, n in sorted(counts.items()))}")
    if summary["checks"]:
        print_table(summary["table"], title="predicted against measured (the chosen plan, built and run here)")
    for line in summary["notes"]:
        print(line)
    print(f"wrote {out}; build it with: slimlm quantize {args.model} --recipe {out} -o OUT")
    if searched is None:
        print(f"(the measured sensitivity is kept in {state}: another budget, or a run interrupted, reuses it)")
    else:
        print(f"(the search's trials are kept in {out.with_name(f'.{out.name}.search.json')}: a run interrupted "
              "resumes from them)")
    if not summary["met"]:
        raise SlimError(summary["missed"])
    return 0
