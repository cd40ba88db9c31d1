"""`slimlm sensitivity MODEL --calib ...`: for every linear layer of the blocks and every treatment
(kept, RTN int8 ... int2, 2:4 and 50% pruning), the KL of the model's output when only that layer is
treated, and the bytes the treatment stores; written as JSON (what `slimlm plan` allocates from)
and, with --heatmap, drawn as layers x treatments."""

from __future__ import annotations

import argparse

from slimlm.commands._common import print_json, print_table, progress_bar, quiet_libraries
from slimlm.commands._flags import add_config_flags, settings_from_args


def sensitivity_config():
    from slimlm.planner.sensitivity import SensitivityConfig

    return SensitivityConfig


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face model folder, or 'demo'")
    p.add_argument("-o", "--output", default="sensitivity.json", help="where the table is written (JSON)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--heatmap", default=None, help="also draw the heat map (PNG; needs matplotlib)")
    p.add_argument("--json", action="store_true")
    add_config_flags(p, [sensitivity_config()])


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    import json
    from pathlib import Path

    from slimlm.api import load
    from slimlm.core.errors import SlimError
    from slimlm.core.files import atomic_file
    from slimlm.planner.sensitivity import measure_sensitivity

    config = sensitivity_config().from_dict(settings_from_args(args, sensitivity_config()))
    out = Path(args.output).expanduser()
    if out.exists() and not args.overwrite:
        raise SlimError(f"'{out}' already exists; pass --overwrite or choose another -o")
    if not out.parent.is_dir():
        raise SlimError(f"parent folder of '{out}' does not exist; create it or choose another -o")
    model, tokenizer = load(args.model)
    _, tokens = config.windows_of(tokenizer)
    state = out.with_name(f".{out.name}.partial.json")  # an interrupted run resumes from it
    with progress_bar(not args.json) as update:
        result = measure_sensitivity(model, tokens, names=list(config.treatments) or None, method=config.method,
                                     fisher_samples=config.fisher_samples, state=state,
                                     on_layer=lambda done, total: update("sensitivity", done, total))
    with atomic_file(out, args.overwrite) as tmp:
        tmp.write_text(json.dumps(dict(result.to_dict(), method=config.method), indent=1) + "\n")
    state.unlink(missing_ok=True)
    if args.heatmap:
        from slimlm.planner.heatmap import draw_heatmap

        with atomic_file(args.heatmap, overwrite=True) as tmp:
            draw_heatmap(result, tmp)
    if args.json:
        print_json(dict(result.to_dict(), output=str(out)))
        return 0
    totals = {t: sum(row[j] for row in result.kl if row[j] == row[j]) for j, t in enumerate(result.treatments)}
    worst = {t: max(range(len(result.layers)), key=lambda i: result.kl[i][j] if result.kl[i][j] == result.kl[i][j] else -1)
             for j, t in enumerate(result.treatments)}
    print_table([{"treatment": t, "sum of per-layer KL": f"{totals[t]:.4g}", "most sensitive layer": result.layers[worst[t]],
                  "MB": f"{sum(row[j] for row in result.bytes) / 1e6:.3f}"}
                 for j, t in enumerate(result.treatments) if t != "keep"],
                title=f"{args.model}: {len(result.layers)} layers x {len(result.treatments)} treatments ({config.method})")
    print(f"wrote {out}" + (f" and {args.heatmap}" if args.heatmap else ""))
    return 0
