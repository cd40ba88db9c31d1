"""`slimlm prune MODEL -m METHOD --sparsity S -o OUT`: prune a model, measure it against the original,
save it. The method's settings are flags derived from the pruning configs."""

from __future__ import annotations

import argparse

from slimlm.commands._common import print_json, print_table, progress_bar, quiet_libraries
from slimlm.commands._flags import add_config_flags, settings_from_args


def _configs() -> dict[str, type]:
    from slimlm.core.steps import STEPS

    return {step.name: step.config_cls for step in STEPS.steps("prune")}


def add_args(p: argparse.ArgumentParser) -> None:
    configs = _configs()
    p.add_argument("model", help="Hugging Face model folder, or 'demo'")
    p.add_argument("-o", "--out", required=True, help="output folder (written atomically)")
    p.add_argument("-m", "--method", default="magnitude",
                   help=f"pruning method: {', '.join(configs)} (default magnitude; heads, channels and blocks "
                        "shrink the model)")
    p.add_argument("--data", default="demo", help="text for the saved report: .txt, .jsonl or 'demo'")
    p.add_argument("--eval-tokens", type=int, default=2048, help="tokens the report evaluates (0: no report)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    add_config_flags(p.add_argument_group("method settings (see slimlm.prune's configs)"), configs.values(),
                     owners={cls: name for name, cls in configs.items()})


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from slimlm.core import format as F
    from slimlm.workflows import compress_one

    configs = _configs()
    from slimlm.core.steps import STEPS

    step = STEPS.get(args.method, "prune")
    settings = settings_from_args(args, step.config_cls, args.method, configs.values())
    with progress_bar(not args.json) as update:
        model, report = compress_one(args.model, [{"method": args.method, **settings}], args.out, args.data,
                                     args.eval_tokens, args.overwrite, progress=update, label="pruned")
    if args.json:
        record = getattr(model.config, F.SPARSITY, None) or getattr(model.config, F.STRUCTURED, None)
        print_json({"out": args.out, "settings": settings, "sparsity": record,
                    "report": report.to_dict() if report else None})
    elif report:
        print_table(report.rows(), title=f"saved {args.out}")
    else:
        print(f"saved {args.out}")
    return 0
