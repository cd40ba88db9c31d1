"""`slimlm sensitivity MODEL --calib ...`: for every linear layer of the blocks and every treatment
(kept, RTN int8 ... int2, 2:4 and 50% pruning), the KL of the model's output when only that layer is
treated, and the bytes the treatment stores; written as JSON (what `slimlm plan` allocates from)
and, with --heatmap, drawn as layers x treatments."""

from __future__ import annotations

import argparse

from slimlm.commands._common import print_json, print_table, progress_bar, quiet_libraries


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face model folder, or 'demo'")
    p.add_argument("-o", "--output", default="sensitivity.json", help="where the table is written (JSON)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--heatmap", default=None, help="also draw the heat map (PNG; needs matplotlib)")
    p.add_argument("--calib", default="demo", help="calibration text (.txt, .jsonl, 'demo'; FILE@0:200 for documents 0-199)")
    p.add_argument("--windows", type=int, default=8, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    p.add_argument("--treatments", default="", help="comma-separated subset (default all): keep,int8,int4 g128,int4 g32,"
                                                    "int3 g32,int2 g32,2:4,50%%")
    p.add_argument("--method", default="fisher", help="fisher (block by block, second order; fast) or direct (exact, "
                                                      "one whole forward per layer and treatment)")
    p.add_argument("--fisher-samples", type=int, default=4, help="sampled next tokens per window (fisher)")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    import json
    from pathlib import Path

    from slimlm.api import load
    from slimlm.core.data import load_tokens
    from slimlm.core.errors import SlimError
    from slimlm.core.files import atomic_file
    from slimlm.planner.sensitivity import measure_sensitivity

    out = Path(args.output).expanduser()
    if out.exists() and not args.overwrite:
        raise SlimError(f"'{out}' already exists; pass --overwrite or choose another -o")
    if not out.parent.is_dir():
        raise SlimError(f"parent folder of '{out}' does not exist; create it or choose another -o")
    for name in ("windows", "seq_len", "fisher_samples"):
        if getattr(args, name) < 1:
            raise SlimError(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    model, tokenizer = load(args.model)
    ids = load_tokens(args.calib, tokenizer)
    if ids.numel() < args.windows * args.seq_len:
        raise SlimError(f"the calibration text has {ids.numel()} tokens, fewer than --windows {args.windows} x --seq-len "
                        f"{args.seq_len}; give more text or lower them")
    tokens = ids[: args.windows * args.seq_len].view(args.windows, args.seq_len)
    names = [t.strip() for t in args.treatments.split(",") if t.strip()] or None
    state = out.with_name(f".{out.name}.partial.json")  # an interrupted run resumes from it
    with progress_bar(not args.json) as update:
        result = measure_sensitivity(model, tokens, names=names, method=args.method, fisher_samples=args.fisher_samples,
                                     state=state, on_layer=lambda done, total: update("sensitivity", done, total))
    with atomic_file(out, args.overwrite) as tmp:
        tmp.write_text(json.dumps(dict(result.to_dict(), method=args.method), indent=1) + "\n")
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
                title=f"{args.model}: {len(result.layers)} layers x {len(result.treatments)} treatments ({args.method})")
    print(f"wrote {out}" + (f" and {args.heatmap}" if args.heatmap else ""))
    return 0
