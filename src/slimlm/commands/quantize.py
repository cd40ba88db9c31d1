"""`slimlm quantize MODEL -o OUT`: quantize a model, measure it against the original, save it.

The method's settings are flags derived from the quantization configs (`--bits`, `--group-size`,
`--damp`, ...); a flag that does not apply to the chosen method is an error."""

from __future__ import annotations

import argparse

from slimlm.commands._common import print_json, print_table, progress_bar, quiet_libraries
from slimlm.commands._flags import add_config_flags, given_flags, settings_from_args


def _configs() -> dict[str, type]:
    from slimlm.core.steps import STEPS

    return {step.name: step.config_cls for step in STEPS.steps("quantize")}


def add_args(p: argparse.ArgumentParser) -> None:
    configs = _configs()
    p.add_argument("model", help="Hugging Face model folder, or 'demo'")
    p.add_argument("-o", "--out", required=True, help="output folder (written atomically)")
    p.add_argument("-m", "--method", default="rtn",
                   help=f"quantization method: {', '.join(configs)} (default rtn; 'cast' for fp16/bf16)")
    p.add_argument("--recipe", default=None, help="YAML file of steps (- method: rtn ...) instead of the flags below")
    p.add_argument("--save-format", default="auto", choices=("auto", "slimlm", "compressed-tensors"),
                   help="checkpoint format (auto: compressed-tensors when it can express the model)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe and the layers it targets, then stop")
    p.add_argument("--data", default="demo", help="text for the saved report: .txt, .jsonl or 'demo'")
    p.add_argument("--eval-tokens", type=int, default=2048, help="tokens the report evaluates (0: no report)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    add_config_flags(p.add_argument_group("method settings (see slimlm.quantize's configs)"), configs.values(),
                     owners={cls: name for name, cls in configs.items()})


def recipe_from_args(args: argparse.Namespace) -> list[dict]:
    configs = _configs()
    if args.recipe:
        from slimlm.core.recipe import load_recipe

        from slimlm.core.errors import SlimError

        given = given_flags(args, configs.values())
        if given:
            raise SlimError(f"with --recipe the settings come from the YAML file; drop {', '.join(given)}")
        return load_recipe(args.recipe)
    from slimlm.core.steps import STEPS

    step = STEPS.get(args.method, "quantize")
    settings = settings_from_args(args, step.config_cls, args.method, configs.values())
    return [{"method": args.method, **settings}]


def dry_run(model, recipe: list[dict], as_json: bool) -> int:
    """Resolve each step's config (all defaults filled in) and list the layers it would touch."""
    from slimlm.core.steps import STEPS

    plan = []
    for step in recipe:
        settings = {k: v for k, v in step.items() if k != "method"}
        _, config = STEPS.resolve(step["method"], settings)
        layers = config.layer_plan(model)
        plan.append({"step": {"method": step["method"], **config.to_dict()}, "layers": layers})
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
    from slimlm import api
    from slimlm.workflows import compress_one

    recipe = recipe_from_args(args)
    if args.dry_run:
        return dry_run(api.load(args.model)[0], recipe, args.json)
    with progress_bar(not args.json) as update:
        _, report = compress_one(args.model, recipe, args.out, args.data, args.eval_tokens, args.overwrite,
                                 args.save_format, update, label="quantized")
    if args.json:
        print_json({"out": args.out, "recipe": recipe, "report": report.to_dict() if report else None})
    elif report:
        print_table(report.rows(), title=f"saved {args.out}")
    else:
        print(f"saved {args.out}")
    return 0
