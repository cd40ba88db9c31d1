"""`slimlm quantize MODEL -o OUT`: quantize a model and save it as a Hugging Face folder."""

from __future__ import annotations

import argparse

from slimlm.commands._common import group_size, print_json, quiet_libraries


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face model folder, or 'demo'")
    p.add_argument("-o", "--out", required=True, help="output folder (written atomically)")
    p.add_argument("-m", "--method", default="rtn", help="quantization method (default rtn; 'cast' for fp16/bf16)")
    p.add_argument("--bits", type=int, default=4, help="weight bits: 8, 4, 3 or 2 (default 4)")
    p.add_argument("--group-size", type=group_size, default=128, help="32, 64, 128, 256 or 'none' for per-channel")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None)
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false")
    p.add_argument("--dtype", default=None, help="for -m cast: float16 or bfloat16")
    p.add_argument("--include", action="append", default=None, help="name glob of layers to quantize (repeatable)")
    p.add_argument("--exclude", action="append", default=None, help="name glob of layers to leave alone (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from slimlm.api import load, quantize, save
    from slimlm.core.model_io import check_output_path
    from slimlm.eval.size import measure_size

    check_output_path(args.out, args.overwrite)
    if args.method == "cast":
        settings = {"dtype": args.dtype or "bfloat16"}
    else:
        settings = {"bits": args.bits, "group_size": args.group_size}
        if args.symmetric is not None:
            settings["symmetric"] = args.symmetric
        if args.include:
            settings["include"] = args.include
        if args.exclude:
            settings["exclude"] = args.exclude
    model, tokenizer = load(args.model)
    before = measure_size(model)
    quantize(model, args.method, **settings)
    after = measure_size(model)
    save(model, args.out, tokenizer, overwrite=args.overwrite)
    summary = {"out": args.out, "method": args.method, "settings": settings,
               "bytes_before": before.weight_bytes, "bytes_after": after.weight_bytes,
               "linear_bits_per_weight": after.linear_bits_per_weight}
    if args.json:
        print_json(summary)
    else:
        print(f"saved {args.out}: {before.weight_bytes / 1e6:.2f} MB -> {after.weight_bytes / 1e6:.2f} MB "
              f"({after.linear_bits_per_weight:.2f} bits per linear weight)")
    return 0
