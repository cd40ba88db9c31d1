"""`slimlm plan MODEL --max-size 140KB`: the mix of per-layer treatments (RTN and GPTQ at int8 ... int2)
with the least predicted KL within a size budget, from measured per-layer sensitivity; prints the
size / predicted-KL front and writes the chosen recipe, which `slimlm quantize --recipe` builds."""

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
    p.add_argument("--overwrite", action="store_true", help="replace --recipe-out if it exists")
    p.add_argument("--sensitivity-out", default=None, help="also write the per-layer sensitivity (KL and bytes) as JSON")
    p.add_argument("--heatmap", default=None, help="also draw the sensitivity heat map (PNG; needs matplotlib)")
    p.add_argument("--json", action="store_true")
    add_config_flags(p, [plan_config()])


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from pathlib import Path

    from slimlm.api import load
    from slimlm.core.data import load_tokens
    from slimlm.core.errors import SlimError
    from slimlm.core.files import atomic_file
    from slimlm.core.recipe import dump_recipe
    from slimlm.planner.allocate import lagrangian_bound
    from slimlm.planner.plan import parse_size, plan

    config = plan_config().from_dict(settings_from_args(args, plan_config()))
    out = Path(args.recipe_out).expanduser()
    if out.exists() and not args.overwrite:
        raise SlimError(f"recipe file '{out}' already exists; pass --overwrite or choose another -o")
    if not out.parent.is_dir():
        raise SlimError(f"parent folder of '{out}' does not exist; create it or choose another -o")
    budget = parse_size(config.max_size) if config.max_size else None
    model, tokenizer = load(args.model)
    del model
    ids = load_tokens(config.calib, tokenizer)
    windows = ids.numel() // config.seq_len
    if windows < config.windows:
        raise SlimError(f"the calibration text has {ids.numel()} tokens: {windows} windows of {config.seq_len}, fewer than "
                        f"--windows {config.windows}; give more text or lower --windows/--seq-len")
    tokens = ids[: config.windows * config.seq_len].view(config.windows, config.seq_len)
    gptq = dict(calib=config.calib, n_samples=config.n_samples, seq_len=config.seq_len)
    state = out.with_name(f".{out.name}.sensitivity.json")  # an interrupted or repeated run reuses it
    with progress_bar(not args.json) as update:
        result = plan(lambda: load(args.model)[0], tokens, budget, max_kl=config.max_kl, calibration=ids, gptq=config.gptq,
                      gptq_settings=gptq, on_layer=lambda done, total: update("sensitivity", done, total),
                      state=str(state), method=config.method, fisher_samples=config.fisher_samples)
    options = result.sensitivity.options()
    bound = lagrangian_bound(options, budget if budget is not None else result.point.bytes)
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
    counts = {}
    for t in result.treatments().values():
        counts[t] = counts.get(t, 0) + 1
    points = result.front.points
    shown = sorted({round(k * (len(points) - 1) / 7) for k in range(8)} | {points.index(result.point)})
    if args.json:
        print_json({"budget_bytes": budget, "bytes": result.point.bytes, "predicted_kl": result.point.loss,
                    "lower_bound": bound, "treatments": result.treatments(), "recipe": str(out),
                    "front": [{"bytes": p.bytes, "predicted_kl": p.loss} for p in points]})
        return 0
    print_table([{"": "->" if points[k] is result.point else "", "KB": f"{points[k].bytes / 1e3:.1f}",
                  "predicted KL": f"{points[k].loss:.4f}"} for k in shown],
                title=f"{args.model}: {len(points)} points on the size / predicted-KL front")
    within = f"of {budget / 1e3:.1f} KB" if budget is not None else f"(the smallest predicted within KL {config.max_kl:g})"
    print(f"chosen: {result.point.bytes / 1e3:.1f} KB {within}, predicted KL {result.point.loss:.4f} "
          f"(no choice can do better than {bound:.4f}); {', '.join(f'{n} {t}' for t, n in sorted(counts.items()))}")
    print(f"wrote {out}; build it with: slimlm quantize {args.model} --recipe {out} -o OUT")
    print(f"(the measured sensitivity is kept in {state}: another budget, or a run interrupted, reuses it)")
    return 0
