"""`slimlm finetune MODEL -o OUT`: recovery fine-tuning of a compressed model, then save it.

Pruned weights stay zero; `--qat` trains quantized layers through their grid (straight-through) and
quantizes them back; `--teacher PATH` distils from the uncompressed model instead of the true tokens
alone (`--alpha` weighs the two)."""

from __future__ import annotations

import argparse

from slimlm.commands._common import quiet_libraries
from slimlm.commands.distill import add_training_args, run_training


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the (compressed) model folder to fine-tune")
    p.add_argument("-o", "--out", required=True, help="output folder (written atomically)")
    p.add_argument("--qat", action="store_true", help="quantization-aware training of the quantized layers")
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
    if args.qat:
        prepare_qat_(model)
    return run_training(args, model, teacher, tokenizer, finish=convert_qat_ if args.qat else (lambda m: None))
