"""`slimlm prune MODEL -m METHOD --sparsity S -o OUT`: prune a model, measure it against the original,
save it."""

from __future__ import annotations

import argparse

from slimlm.commands._common import print_json, print_table, progress_bar, quiet_libraries

METHODS = ("magnitude", "random", "taylor", "wanda", "sparsegpt", "heads", "channels", "blocks")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face model folder, or 'demo'")
    p.add_argument("-o", "--out", required=True, help="output folder (written atomically)")
    p.add_argument("-m", "--method", default="magnitude", help=f"one of {', '.join(METHODS)} (default magnitude)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction of each layer's weights set to zero (default 0.5), or of the heads / channels / "
                        "blocks removed (default 0.25)")
    p.add_argument("--pattern", default=None, help="n:m sparsity instead, e.g. 2:4 (keep 2 of every 4 inputs)")
    p.add_argument("--scope", default=None, choices=("row", "layer", "global"),
                   help="which weights compete: each output row, each layer, or all layers (default: the method's)")
    p.add_argument("--importance", default=None, choices=("magnitude", "activation", "gradient"),
                   help="heads/channels: how units are ranked (default magnitude; blocks use Block Influence)")
    p.add_argument("--include", action="append", default=None, help="name glob of layers to prune (repeatable)")
    p.add_argument("--exclude", action="append", default=None, help="name glob of layers to leave alone (repeatable)")
    cal = p.add_argument_group("calibrated methods (taylor, wanda, sparsegpt)")
    cal.add_argument("--calib", default=None, help="calibration text: .txt/.jsonl or 'demo'; file.txt@0:500 takes documents 0-499")
    cal.add_argument("--n-samples", type=int, default=None, help="calibration windows (default 128)")
    cal.add_argument("--seq-len", type=int, default=None, help="tokens per calibration window (default 512)")
    cal.add_argument("--damp", type=float, default=None, help="SparseGPT dampening (default 0.01)")
    cal.add_argument("--block-size", type=int, default=None, help="SparseGPT block of columns (default 128)")
    p.add_argument("--data", default="demo", help="text for the saved report: .txt, .jsonl or 'demo'")
    p.add_argument("--eval-tokens", type=int, default=2048, help="tokens the report evaluates (0: no report)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def settings_from_args(args: argparse.Namespace) -> dict:
    settings = {}
    for key in ("sparsity", "pattern", "scope", "importance", "include", "exclude", "calib", "n_samples", "seq_len",
                "damp", "block_size"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    return settings


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from slimlm.api import load, measure_variant, prune, save
    from slimlm.core.data import load_tokens
    from slimlm.core.files import check_output_path
    from slimlm.eval.report import Report
    from slimlm.presets import describe

    check_output_path(args.out, args.overwrite)
    settings = settings_from_args(args)
    model, tokenizer = load(args.model)
    report = None
    if args.eval_tokens:
        ids = load_tokens(args.data, tokenizer, args.eval_tokens)
        original = load(args.model)[0]
    with progress_bar(not args.json) as update:
        prune(model, args.method, tokenizer=tokenizer, on_block=lambda d, t: update("prune: blocks", d, t), **settings)
    if args.eval_tokens:
        report = Report(model=str(args.model), data=str(args.data))
        with progress_bar(not args.json) as update:
            report.variants.append(measure_variant(original, "original", "as loaded", ids, original, progress=update))
            report.variants.append(measure_variant(model, "pruned", describe(model.slimlm_recipe), ids, original,
                                                   progress=update))
    save(model, args.out, tokenizer, report=report)
    if args.json:
        record = getattr(model.config, "slimlm_sparsity", None) or getattr(model.config, "slimlm_structured", None)
        print_json({"out": args.out, "settings": settings, "sparsity": record,
                    "report": report.to_dict() if report else None})
    elif report:
        print_table(report.rows(), title=f"saved {args.out}")
    else:
        print(f"saved {args.out}")
    return 0
