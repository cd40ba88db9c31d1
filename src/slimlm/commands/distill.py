"""`slimlm distill TEACHER -o OUT`: train a smaller student to match a teacher, then save it.
Data parallel on CPU: `torchrun --nproc-per-node 2 -m slimlm.cli distill ...` (each process takes
a share of every batch; --batch-size is the global one).

The student is the teacher's blocks 0, 2, 4, ... by default (`--keep-blocks 0,3,5` picks others),
or any model folder (`--student PATH`). `--alpha 1` trains on the true tokens only (no teacher)."""

from __future__ import annotations

import argparse

from slimlm.commands._common import print_json, print_table, progress_bar, quiet_libraries


def add_training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="demo", help="training text: .txt/.jsonl or 'demo'; file.txt@0:800 takes documents 0-799")
    p.add_argument("--eval-data", default=None, help="held-out text for periodic evaluation (e.g. file.txt@800:)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 200)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3)")
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="blocks per micro-batch (default 8)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (default 1)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per block (default 256)")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--bf16", dest="bf16", action="store_true", default=None, help="bfloat16 autocast (default: where native)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in OUT/training")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("teacher", help="teacher model folder, or 'demo'")
    p.add_argument("-o", "--out", required=True, help="output folder for the student (written atomically)")
    p.add_argument("--student", default=None, help="a student model folder (default: a subset of the teacher's blocks)")
    p.add_argument("--keep-blocks", default=None, help="teacher blocks the student keeps, e.g. 0,2,4 (default every other)")
    p.add_argument("--alpha", type=float, default=None, help="weight of the true-token loss (default 0.5)")
    p.add_argument("--temperature", type=float, default=None, help="softmax temperature of the soft targets (default 2)")
    p.add_argument("--reverse-kl", action="store_true", default=None, help="KL(student || teacher) instead")
    add_training_args(p)


TRAIN_KEYS = ("steps", "lr", "warmup_steps", "batch_size", "grad_accum", "seq_len", "weight_decay", "bf16",
              "eval_every", "save_every", "seed", "alpha", "temperature", "reverse_kl")


def training_settings(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in TRAIN_KEYS if getattr(args, k, None) is not None}


def run_training(args, model, teacher, tokenizer, finish) -> int:
    """Shared by distill and finetune: train with a progress bar, evaluate, save atomically."""
    from pathlib import Path

    from slimlm.api import distill
    from slimlm.core.files import check_output_path

    rank = _join_process_group()
    if not args.resume and rank == 0:
        check_output_path(args.out, args.overwrite)
    work = Path(str(args.out) + ".training")  # checkpoints live beside the output until it is written
    settings = training_settings(args)
    steps = settings.get("steps", 200)
    with progress_bar(not args.json) as update:
        history = distill(model, teacher, tokenizer, args.data, args.eval_data, out=work, resume=args.resume,
                          on_step=lambda s, r: update("train", s, steps, f"loss {r['loss']:.3f} "
                                                                          f"{r['tokens_per_s']:.0f} tok/s"), **settings)
    finish(model)
    try:
        if rank == 0:  # under torchrun every process trained the same model; rank 0 saves and reports
            _save_and_report(args, model, tokenizer, history, work)
    finally:
        _leave_process_group()
    return 0


def _save_and_report(args, model, tokenizer, history: list[dict], work) -> None:
    from pathlib import Path

    from slimlm.api import save

    save(model, args.out, tokenizer, overwrite=True)
    for name in ("history.json", "loss.png"):
        if (work / name).is_file():
            (work / name).replace(Path(args.out) / name)
    last = history[-1] if history else {}
    evals = [h for h in history if "eval_ppl" in h]
    summary = {"out": str(args.out), "steps": last.get("step"), "train_loss": last.get("loss"),
               "eval_ppl": evals[-1]["eval_ppl"] if evals else None, "tokens_per_s": last.get("tokens_per_s"),
               "checkpoint": str(work)}
    if args.json:
        print_json(summary)
    else:
        print_table([{k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in summary.items()}],
                    title=f"saved {args.out}")


def _leave_process_group() -> None:
    """Wait for every process, then leave the group (a process that exits inside it aborts gloo)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _join_process_group() -> int:
    """Under torchrun (WORLD_SIZE > 1) join the process group (gloo on CPU, NCCL on GPUs); returns the rank."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank()


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from slimlm.api import load
    from slimlm.distillation.students import layer_subset

    teacher, tokenizer = load(args.teacher)
    if args.student:
        student, _ = load(args.student)
    else:
        keep = [int(i) for i in args.keep_blocks.split(",")] if args.keep_blocks else None
        student = layer_subset(teacher, keep)
    return run_training(args, student, teacher, tokenizer, finish=lambda m: None)
