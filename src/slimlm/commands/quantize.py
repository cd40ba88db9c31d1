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
    p.add_argument("--format", dest="number_format", default=None, choices=("int", "log", "fp8"),
                   help="code format: int (default), log (powers of two; bits 4/3/2) or fp8 (e4m3; bits 8); log/fp8 are symmetric")
    p.add_argument("--override", action="append", default=None, metavar="GLOB=SETTINGS",
                   help="per-layer scheme, repeatable, first match wins: '*.self_attn.*=bits:8,group_size:none' "
                        "or 'model.layers.0.*=skip'")
    p.add_argument("--save-format", default="auto", choices=("auto", "slimlm", "compressed-tensors"),
                   help="checkpoint format (auto: compressed-tensors when it can express the model)")
    p.add_argument("--dtype", default=None, help="for -m cast: float16 or bfloat16")
    p.add_argument("--include", action="append", default=None, help="name glob of layers to quantize (repeatable)")
    p.add_argument("--exclude", action="append", default=None, help="name glob of layers to leave alone (repeatable)")
    cal = p.add_argument_group("calibrated methods (gptq, awq, smoothquant)")
    cal.add_argument("--calib", default=None, help="calibration text: .txt/.jsonl or 'demo'; file.txt@0:500 takes documents 0-499")
    cal.add_argument("--n-samples", type=int, default=None, help="calibration windows (default 128)")
    cal.add_argument("--seq-len", type=int, default=None, help="tokens per calibration window (default 512)")
    cal.add_argument("--damp", type=float, default=None, help="GPTQ dampening, fraction of mean(diag H) (default 0.01)")
    cal.add_argument("--act-order", action="store_true", default=None, help="GPTQ: quantize columns by decreasing H_ii")
    cal.add_argument("--block-size", type=int, default=None, help="GPTQ lazy-update block (default 128)")
    cal.add_argument("--grid", type=int, default=None, help="AWQ: exponents tried in the scale search (default 20)")
    cal.add_argument("--alpha", type=float, default=None, help="SmoothQuant migration strength in [0, 1] (default 0.5)")
    cal.add_argument("--no-clip", dest="clip", action="store_false", default=None, help="AWQ: skip the clipping search")
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe and the layers it targets, then stop")
    p.add_argument("--data", default="demo", help="text for the saved report: .txt, .jsonl or 'demo'")
    p.add_argument("--eval-tokens", type=int, default=2048, help="tokens the report evaluates (0: no report)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def parse_override(text: str) -> tuple[str, object]:
    """'GLOB=skip' or 'GLOB=key:value,key:value' (values parsed as YAML scalars: 8, none, true)."""
    import yaml

    from slimlm.core.errors import SlimError

    glob, sep, spec = text.partition("=")
    if not sep or not glob or not spec:
        raise SlimError(f"--override '{text}' must look like 'GLOB=skip' or 'GLOB=bits:8,group_size:none'")
    if spec.strip() == "skip":
        return glob, "skip"
    settings = {}
    for item in spec.split(","):
        key, sep, value = item.partition(":")
        if not sep:
            raise SlimError(f"--override '{text}': '{item}' must look like key:value, e.g. bits:8")
        value = value.strip()
        settings[key.strip()] = None if value.lower() in ("none", "null", "channel") else yaml.safe_load(value)
    return glob, settings


def recipe_from_args(args: argparse.Namespace) -> list[dict]:
    if args.recipe:
        from slimlm.core.recipe import load_recipe

        return load_recipe(args.recipe)
    if args.method == "cast":
        return [{"method": "cast", "dtype": args.dtype or "bfloat16"}]
    step = {"method": args.method} if args.method == "smoothquant" else \
        {"method": args.method, "bits": args.bits, "group_size": args.group_size}
    if args.number_format:
        step["format"] = args.number_format
        if args.number_format != "int" and args.symmetric is None:
            step["symmetric"] = True  # the log and fp8 codes carry their own sign
    if args.override:
        step["overrides"] = dict(parse_override(text) for text in args.override)
    optional = ("symmetric", "include", "exclude", "calib", "n_samples", "seq_len", "damp", "act_order", "block_size", "grid", "clip", "alpha")
    for key in optional:
        if getattr(args, key) is not None:
            step[key] = getattr(args, key)
    return [step]


def dry_run(model, recipe: list[dict], as_json: bool) -> int:
    """Resolve each step's config (all defaults filled in) and list the layers it would touch."""
    from slimlm.core.targeting import select_linear
    from slimlm.pruning.methods import PRUNERS, get_pruner
    from slimlm.quant.methods import get_method

    get_pruner("magnitude")  # fills the registry
    plan = []
    for step in recipe:
        settings = {k: v for k, v in step.items() if k != "method"}
        find = get_pruner if step["method"] in PRUNERS.names() else get_method
        config = find(step["method"]).config_cls.from_dict(settings)
        resolved = {"method": step["method"], **config.to_dict()}
        if hasattr(config, "scheme_for"):  # per-layer schemes (overrides resolved)
            layers = {name: config.scheme_for(name).label() for name in config.targets(model)}
        elif hasattr(config, "include"):
            layers = {name: step["method"] for name in select_linear(model, config.include, config.exclude)}
        else:
            layers = {}
        plan.append({"step": resolved, "layers": layers})
    if as_json:
        print_json(plan)
        return 0
    for item in plan:
        print(" ".join(f"{k}={v}" for k, v in item["step"].items()))
        by_scheme: dict[str, list[str]] = {}
        for name, label in item["layers"].items():
            by_scheme.setdefault(label, []).append(name)
        for label, names in by_scheme.items():
            print(f"  {label}: {len(names)} layers: " + ", ".join(names))
    return 0


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from slimlm.api import apply_recipe, load, measure_variant, save
    from slimlm.core.data import load_tokens
    from slimlm.core.files import check_output_path
    from slimlm.eval.report import Report
    from slimlm.presets import describe

    if not args.dry_run:
        check_output_path(args.out, args.overwrite)
    recipe = recipe_from_args(args)
    model, tokenizer = load(args.model)
    if args.dry_run:
        return dry_run(model, recipe, args.json)
    report = None
    if args.eval_tokens:
        ids = load_tokens(args.data, tokenizer, args.eval_tokens)
        original = load(args.model)[0]
    with progress_bar(not args.json) as update:
        apply_recipe(model, recipe, tokenizer, on_block=lambda done, total: update("quantize: blocks", done, total))
    if args.eval_tokens:
        report = Report(model=str(args.model), data=str(args.data))
        with progress_bar(not args.json) as update:
            report.variants.append(measure_variant(original, "original", "as loaded", ids, original, progress=update))
            report.variants.append(measure_variant(model, "quantized", describe(model.slimlm_recipe), ids, original,
                                                   progress=update))
    save(model, args.out, tokenizer, report=report, format=args.save_format)  # records the resolved recipe (every setting)
    if args.json:
        print_json({"out": args.out, "recipe": recipe, "report": report.to_dict() if report else None})
    elif report:
        print_table(report.rows(), title=f"saved {args.out}")
    else:
        print(f"saved {args.out}")
    return 0
