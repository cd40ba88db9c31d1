"""`slimlm finetune MODEL -o OUT`: recovery fine-tuning of a compressed model, then save it.

Pruned weights stay zero; `--qat` trains quantized layers through their grid (straight-through) and
quantizes them back; `--lora R` trains only low-rank adapters and merges them at the end;
`--teacher PATH` distils from the uncompressed model instead of the true tokens alone (`--alpha`
weighs the two). Training flags are derived from `TrainConfig`."""

from __future__ import annotations

import argparse

from slimlm.commands._common import quiet_libraries
from slimlm.commands.distill import add_run_args, run_training


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the (compressed) model folder to fine-tune")
    p.add_argument("-o", "--out", required=True, help="output folder (written atomically)")
    p.add_argument("--qat", action="store_true", help="quantization-aware training of the quantized layers")
    p.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="train only rank-RANK adapters on the frozen model and merge them at the end")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scaling numerator: adapters add (alpha/rank)·BA")
    p.add_argument("--lora-targets", action="append", default=None, help="layer globs for adapters (default all)")
    p.add_argument("--teacher", default=None, help="distil from this model (e.g. the original) as well")
    add_run_args(p)


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from slimlm.workflows import finetune_to

    return run_training(args, finetune_to, model=args.model, teacher=args.teacher, qat=args.qat, lora=args.lora,
                        lora_alpha=args.lora_alpha, lora_targets=tuple(args.lora_targets or ("*",)))
