"""`slimlm distill TEACHER -o OUT`: train a smaller student to match a teacher, then save it.
Data parallel on CPU: `torchrun --nproc-per-node 2 -m slimlm.cli distill ...` (each process takes
a share of every batch; --batch-size is the global one).

The student is the teacher's blocks 0, 2, 4, ... by default (`--keep-blocks 0,3,5` picks others),
or any model folder (`--student PATH`). `--alpha 1` trains on the true tokens only (no teacher).
Training flags are derived from `TrainConfig`."""

from __future__ import annotations

import argparse

from slimlm.commands._common import print_json, print_table, progress_bar, quiet_libraries
from slimlm.commands._flags import add_config_flags, int_list, settings_from_args


def train_config():
    from slimlm import TrainConfig

    return TrainConfig


def add_run_args(p: argparse.ArgumentParser) -> None:
    """What distill and finetune share besides the training settings."""
    p.add_argument("--data", default="demo", help="training text: .txt/.jsonl or 'demo'; file.txt@0:800 takes documents 0-799")
    p.add_argument("--eval-data", default=None, help="held-out text for periodic evaluation (e.g. file.txt@800:)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in OUT.training")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    add_config_flags(p.add_argument_group("training settings"), [train_config()])


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("teacher", help="teacher model folder, or 'demo'")
    p.add_argument("-o", "--out", required=True, help="output folder for the student (written atomically)")
    p.add_argument("--student", default=None, help="a student model folder (default: a subset of the teacher's blocks)")
    p.add_argument("--keep-blocks", type=int_list, default=None,
                   help="teacher blocks the student keeps, e.g. 0,2,4 (default every other)")
    add_run_args(p)


def run_training(args: argparse.Namespace, workflow, **kwargs) -> int:
    """Shared by distill and finetune: train with a progress bar, save, print the summary."""
    settings = settings_from_args(args, train_config())
    steps = settings.get("steps", train_config().steps)
    with progress_bar(not args.json) as update:
        _, summary = workflow(out=args.out, data=args.data, eval_data=args.eval_data, resume=args.resume,
                              overwrite=args.overwrite, on_step=lambda s, r: update(
                                  "train", s, steps, f"loss {r['loss']:.3f} {r['tokens_per_s']:.0f} tok/s"),
                              **kwargs, **settings)
    if args.json:
        print_json(summary)
    else:
        print_table([{k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in summary.items()}],
                    title=f"saved {args.out}")
    return 0


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from slimlm.workflows import distill_to

    return run_training(args, distill_to, teacher=args.teacher, student=args.student,
                        keep_blocks=list(args.keep_blocks) if args.keep_blocks else None)
