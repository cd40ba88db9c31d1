"""`slimlm quantize MODEL -o OUT`: quantize a model, measure it against the original, save it."""

from __future__ import annotations

import argparse

from slimlm.commands._common import group_size, print_json, print_table, progress_bar, quiet_libraries


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face model folder, or 'demo'")
    p.add_argument("-o", "--out", required=True, help="output folder (written atomically)")
    p.add_argument("-m", "--method", default="rtn", help="quantization method (default rtn; 'cast' for fp16/bf16)")
    p.add_argument("--recipe", default=None, help="YAML file of steps (- method: rtn ...) instead of the flags below")
    p.add_argument("--bits", type=int, default=4, help="weight bits: 8, 4, 3 or 2 (default 4)")
    p.add_argument("--group-size", type=group_size, default=128, help="32, 64, 128, 256 or 'none' for per-channel")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None)
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false")
    p.add_argument("--dtype", default=None, help="for -m cast: float16 or bfloat16")
    p.add_argument("--include", action="append", default=None, help="name glob of layers to quantize (repeatable)")
    p.add_argument("--exclude", action="append", default=None, help="name glob of layers to leave alone (repeatable)")
    p.add_argument("--data", default="demo", help="text for the saved report: .txt, .jsonl or 'demo'")
    p.add_argument("--eval-tokens", type=int, default=2048, help="tokens the report evaluates (0: no report)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def recipe_from_args(args: argparse.Namespace) -> list[dict]:
    if args.recipe:
        from slimlm.core.recipe import load_recipe

        return load_recipe(args.recipe)
    if args.method == "cast":
        return [{"method": "cast", "dtype": args.dtype or "bfloat16"}]
    step = {"method": args.method, "bits": args.bits, "group_size": args.group_size}
    for key in ("symmetric", "include", "exclude"):
        if getattr(args, key) is not None:
            step[key] = getattr(args, key)
    return [step]


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from slimlm.api import apply_recipe, load, measure_variant, save
    from slimlm.core.data import load_tokens
    from slimlm.core.model_io import check_output_path
    from slimlm.eval.report import Report
    from slimlm.presets import describe

    check_output_path(args.out, args.overwrite)
    recipe = recipe_from_args(args)
    model, tokenizer = load(args.model)
    report = None
    if args.eval_tokens:
        ids = load_tokens(args.data, tokenizer, args.eval_tokens)
        original = load(args.model)[0]
    apply_recipe(model, recipe)
    if args.eval_tokens:
        report = Report(model=str(args.model), data=str(args.data))
        with progress_bar(not args.json) as update:
            report.variants.append(measure_variant(original, "original", "as loaded", ids, original, progress=update))
            report.variants.append(measure_variant(model, "quantized", describe(model.slimlm_recipe), ids, original,
                                                   progress=update))
    save(model, args.out, tokenizer, report=report)  # records the resolved recipe (every setting)
    if args.json:
        print_json({"out": args.out, "recipe": recipe, "report": report.to_dict() if report else None})
    elif report:
        print_table(report.rows(), title=f"saved {args.out}")
    else:
        print(f"saved {args.out}")
    return 0
