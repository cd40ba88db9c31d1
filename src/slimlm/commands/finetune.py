"""`slimlm finetune MODEL -o OUT`: recovery fine-tuning of a compressed model, then save it.

Pruned weights stay zero; `--qat` trains quantized layers through their grid (straight-through) and
quantizes them back; `--lora R` trains only low-rank adapters and merges them at the end; `--teacher PATH` distils from the uncompressed model instead of the true tokens
alone (`--alpha` weighs the two)."""

from __future__ import annotations

import argparse

from slimlm.commands._common import quiet_libraries
from slimlm.commands.distill import add_training_args, run_training


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the (compressed) model folder to fine-tune")
    p.add_argument("-o", "--out", required=True, help="output folder (written atomically)")
    p.add_argument("--qat", action="store_true", help="quantization-aware training of the quantized layers")
    p.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="train only rank-RANK adapters on the frozen model and merge them at the end")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", action="append", default=None, help="layer globs for adapters (default all)")
    p.add_argument("--teacher", default=None, help="distil from this model (e.g. the original) as well")
    p.add_argument("--alpha", type=float, default=None, help="with --teacher: weight of the true-token loss (default 0.5)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--reverse-kl", action="store_true", default=None)
    add_training_args(p)


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from slimlm.api import load
    from slimlm.distillation.qat import convert_qat_, prepare_qat_

    model, tokenizer = load(args.model)
    teacher = load(args.teacher)[0] if args.teacher else None
    from slimlm.core.errors import SlimError
    from slimlm.distillation.lora import add_lora_, merge_lora_

    if args.qat and args.lora:
        raise SlimError("choose --qat or --lora, not both")
    finish = lambda m: None  # noqa: E731
    if args.qat:
        prepare_qat_(model)
        finish = convert_qat_
    if args.lora:
        add_lora_(model, args.lora, args.lora_alpha, tuple(args.lora_targets or ("*",)))
        finish = merge_lora_
    return run_training(args, model, teacher, tokenizer, finish=finish)
