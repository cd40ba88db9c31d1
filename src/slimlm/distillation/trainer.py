"""The training loop shared by distillation and recovery fine-tuning.

A student is trained on packed token blocks (n, T) with AdamW, a linear warm-up then cosine decay,
gradient accumulation, gradient clipping, bfloat16 autocast where the hardware has native bf16 math,
and periodic evaluation on held-out blocks. With a teacher (frozen, under no_grad) the loss is
`losses.distillation_loss`; without one it is plain cross-entropy (fine-tuning).

Data parallel: under torch.distributed (e.g. `torchrun --nproc-per-node 2 -m slimlm.cli distill ...`;
gloo on CPU, NCCL on GPUs) each process takes its slice of every global batch and DDP averages the
gradients, so the loss curve is the one-process curve on the same global batch (tested with two CPU
processes); only rank 0 writes.

Checkpoints (`checkpoint.py`: safetensors + JSON, no pickle) hold everything a resumed run needs
(student, optimizer, schedule, step, history, RNG state); batches are a pure function of (seed, step), so a run killed after a checkpoint and resumed
ends bit-identical to one that never stopped (tested). Pruned layers keep their zeros: with
`keep_masks`, gradients and weights are masked after every step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from slimlm.core import format as F
from slimlm.core.config import Config, check, field
from slimlm.core.errors import SlimError
from slimlm.distillation.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from slimlm.distillation.losses import distillation_loss, hard_loss, hidden_loss
from slimlm.distillation.teacher_cache import TopKTeacher, soft_loss_topk



@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    name = "train"
    steps: int = field(200, "optimizer steps")
    lr: float = field(1e-3, "peak learning rate")
    warmup_steps: int = field(20, "steps of linear warm-up before the cosine decay")
    min_lr_ratio: float = field(0.1, "the cosine decays to lr * min_lr_ratio")
    weight_decay: float = field(0.0, "AdamW weight decay")
    batch_size: int = field(8, "blocks per micro-batch (the global batch under torchrun)")
    grad_accum: int = field(1, "micro-batches per optimizer step")
    seq_len: int = field(256, "tokens per block")
    alpha: float = field(0.5, "weight of the true-token loss; 1 - alpha goes to the teacher's soft targets")
    temperature: float = field(2.0, "softmax temperature of the soft targets")
    reverse_kl: bool = field(False, "KL(student || teacher) instead of KL(teacher || student)")
    clip: float = field(1.0, "gradient norm clipping (0: off)")
    bf16: bool | None = field(None, "bfloat16 autocast (default: where the hardware has native bf16 math)")
    eval_every: int = field(50, "steps between evaluations on --eval-data")
    save_every: int = field(50, "steps between checkpoints")
    seed: int = field(0, "seed of the batch order")
    keep_masks: bool = field(True, "pruned (exactly zero) weights of the pruned layers stay zero")
    hidden_weight: float = field(0.0, "weight of hidden-state matching (needs a teacher)")
    hidden_loss: str = field("mse", "hidden-state loss: mse or cosine")
    hidden_layers: tuple[tuple[int, int], ...] = field((), "(student layer, teacher layer) pairs; () = last to last",
                                                       cli=False)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_every", "save_every"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                  f"{name} {value!r} must be a positive integer")
        check(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "warmup_steps must be >= 0")
        check(isinstance(self.lr, (int, float)) and 0 < self.lr < 1, f"lr {self.lr!r} must be in (0, 1), e.g. 1e-3")
        check(0 <= self.alpha <= 1, f"alpha {self.alpha!r} must be in [0, 1]")
        check(self.temperature > 0, f"temperature {self.temperature!r} must be positive")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]")
        check(self.clip >= 0, "clip must be >= 0 (0: no clipping)")
        check(self.hidden_weight >= 0 and self.hidden_loss in ("mse", "cosine"),
              "hidden_weight must be >= 0 and hidden_loss mse or cosine")
        object.__setattr__(self, "hidden_layers", tuple(tuple(int(i) for i in pair) for pair in self.hidden_layers))


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_indices(n: int, step: int, micro: int, config: TrainConfig) -> Tensor:
    """Block indices of one micro-batch: epochs are seeded permutations, so batches depend only on
    (seed, step), which makes a resumed run see the same data."""
    per_step = config.batch_size * config.grad_accum
    start = (step * per_step + micro * config.batch_size)
    idx = []
    for i in range(start, start + config.batch_size):
        epoch, pos = divmod(i, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch))
        idx.append(int(perm[pos]))
    return torch.tensor(idx)


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    from slimlm.core.cpp_ext import cpu_flags

    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def pruning_masks(model: nn.Module) -> dict[str, Tensor]:
    """Masks (True = kept) of the layers the model's pruning record names."""
    record = getattr(model.config, F.SPARSITY, None) or {}
    masks = {}
    for name in record.get("targets", []):
        try:
            w = model.get_submodule(name).weight
        except AttributeError:
            continue
        masks[name] = w.detach() != 0
    return masks


@torch.no_grad()
def evaluate_loss(model: nn.Module, blocks: Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over blocks (n, T)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in blocks.split(batch_size):
        batch = batch.to(device)
        logits = model(batch).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                 reduction="sum")
        total += float(loss)
        count += batch[:, 1:].numel()
    model.train(was)
    return total / count


def train(student: nn.Module, train_blocks: Tensor, eval_blocks: Tensor | None, config: TrainConfig,
          teacher: "nn.Module | TopKTeacher | None" = None, out: str | os.PathLike | None = None, resume: bool = False,
          on_step: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Train `student` in place on train_blocks (n, T); returns the history (one dict per logged step).

    out: folder for checkpoints, history.json and loss.png; resume: continue from its checkpoint."""
    check(train_blocks.dim() == 2 and train_blocks.shape[0] >= 1, "training data must be token blocks (n, T)")
    rank, world = _distributed()
    check(config.batch_size % world == 0, f"batch_size {config.batch_size} must be divisible by the {world} processes")
    _check_batch_fits(student, teacher, config, world, train_blocks.shape[1])
    device = next(student.parameters()).device
    use_bf16 = native_bf16(device) if config.bf16 is None else config.bf16
    folder = Path(out) if out is not None else None
    params = [p for p in student.parameters() if p.requires_grad]
    check(params, "the student has no trainable parameters (requires_grad is off everywhere)")
    pairs, projections = _hidden_pairs(student, teacher, config, device)
    params += [p for proj in projections for p in proj.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    masks = pruning_masks(student) if config.keep_masks else {}
    history: list[dict] = []
    start = 0
    if resume:
        check(has_checkpoint(folder), f"no checkpoint to resume in {folder}; start without --resume")
        start, history = _restore(load_checkpoint(folder), folder, student, optimizer, schedule)
    if isinstance(teacher, TopKTeacher):
        check(teacher.indices.shape[0] == train_blocks.shape[0], "the cached teacher outputs are for other blocks")
        check(not pairs, "hidden-state matching needs a live teacher, not cached logits")
    elif teacher is not None:
        teacher.eval()  # frozen: its forward runs under no_grad (its requires_grad flags are left alone)
    student.train()
    forward = student
    if world > 1:  # data parallel: each process takes its share of every global batch; DDP averages gradients
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    writer = folder if rank == 0 else None  # one process writes checkpoints and history
    tokens_seen, t0 = 0, time.perf_counter()
    for step in range(start, config.steps):
        optimizer.zero_grad(set_to_none=True)
        parts_sum: dict[str, float] = {}
        for micro in range(config.grad_accum):
            chosen = batch_indices(train_blocks.shape[0], step, micro, config)[rank::world]
            batch = train_blocks[chosen].to(device)  # (B / world, T)
            labels = batch[:, 1:].reshape(-1)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out_s = forward(batch, output_hidden_states=bool(pairs))
                logits = out_s.logits[:, :-1]
                teacher_logits = out_t = None
                if isinstance(teacher, nn.Module):
                    with torch.no_grad():
                        out_t = teacher(batch, output_hidden_states=bool(pairs))
                        teacher_logits = out_t.logits[:, :-1].reshape(-1, logits.shape[-1])
            if isinstance(teacher, TopKTeacher):  # cached top-k logits instead of a live teacher
                flat = logits.reshape(-1, logits.shape[-1])
                hard = hard_loss(flat, labels)
                t_idx, t_val = teacher.lookup(chosen, device)
                soft = soft_loss_topk(flat, t_idx, t_val, config.temperature, mask=labels != -100)
                loss = config.alpha * hard + (1 - config.alpha) * soft
                parts = {"hard": float(hard.detach()), "soft": float(soft.detach())}
            else:
                loss, parts = distillation_loss(logits.reshape(-1, logits.shape[-1]), labels, teacher_logits,
                                                config.alpha, config.temperature, config.reverse_kl)
            if pairs:
                h = sum(hidden_loss(out_s.hidden_states[i].flatten(0, 1), out_t.hidden_states[j].flatten(0, 1),
                                    config.hidden_loss, proj) for (i, j), proj in zip(pairs, projections)) / len(pairs)
                loss = loss + config.hidden_weight * h
                parts["hidden"] = float(h.detach())
            (loss / config.grad_accum).backward()
            for k, v in {"loss": float(loss.detach()), **parts}.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v / config.grad_accum
            tokens_seen += batch.numel() * world
        _mask_(student, masks, grads=True)
        if config.clip:
            torch.nn.utils.clip_grad_norm_(params, config.clip)
        optimizer.step()
        schedule.step()
        _mask_(student, masks, grads=False)
        record = {"step": step + 1, "lr": optimizer.param_groups[0]["lr"], **parts_sum,
                  "tokens_per_s": tokens_seen / max(time.perf_counter() - t0, 1e-9)}
        if eval_blocks is not None and ((step + 1) % config.eval_every == 0 or step + 1 == config.steps):
            record["eval_loss"] = evaluate_loss(student, eval_blocks, config.batch_size)
            record["eval_ppl"] = math.exp(record["eval_loss"])
        history.append(record)
        if world > 1:  # the logged loss is the global batch's
            record.update({k: _all_mean(v) for k, v in parts_sum.items()})
        if writer is not None and ((step + 1) % config.save_every == 0 or step + 1 == config.steps):
            _save(writer, student, optimizer, schedule, step + 1, history)
        if on_step is not None:
            on_step(step + 1, record)
    student.eval()
    if writer is not None:
        _write_history(writer, history)
    return history


def _check_batch_fits(student: nn.Module, teacher, config: TrainConfig, world: int, seq_len: int) -> None:
    """Refuse a micro-batch whose logits (student, its gradient, the teacher's) cannot be held."""
    from slimlm.core.memory import check_fits

    param = next(student.parameters())
    copies = 3 if isinstance(teacher, nn.Module) else 2
    check_fits(copies * config.batch_size // world * seq_len * student.config.vocab_size * 4,
               f"a micro-batch of {config.batch_size // world} blocks x {seq_len} tokens",
               "lower --batch-size (raise --grad-accum to keep the global batch)", param.device)


def _hidden_pairs(student: nn.Module, teacher: nn.Module | None, config: TrainConfig,
                  device: torch.device) -> tuple[list[tuple[int, int]], list[nn.Module | None]]:
    """Hidden-state pairs (indices into `hidden_states`: 0 = embeddings, i = after block i) and a learned
    projection per pair where the widths differ."""
    if config.hidden_weight == 0:
        return [], []
    check(isinstance(teacher, nn.Module), "hidden-state matching needs a live teacher")
    n_s, n_t = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    pairs = list(config.hidden_layers) or [(n_s, n_t)]
    check(all(0 <= i <= n_s and 0 <= j <= n_t for i, j in pairs),
          f"hidden_layers pairs must index 0..{n_s} (student) and 0..{n_t} (teacher)")
    c_s, c_t = student.config.hidden_size, teacher.config.hidden_size
    projections = [nn.Linear(c_s, c_t, bias=False).to(device) if c_s != c_t else None for _ in pairs]
    return pairs, projections


def _distributed() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group, (0, 1) when not running under one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_mean(value: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


@torch.no_grad()
def _mask_(model: nn.Module, masks: dict[str, Tensor], grads: bool) -> None:
    for name, mask in masks.items():
        w = model.get_submodule(name).weight
        if grads:
            if w.grad is not None:
                w.grad.mul_(mask)
        else:
            w.mul_(mask)


def _save(folder: Path, student, optimizer, schedule, step: int, history: list[dict]) -> None:
    """Checkpoint atomically (a crash mid-save leaves the previous one), as safetensors + JSON."""
    save_checkpoint(folder, {"student": student.state_dict(), "optimizer": optimizer.state_dict(),
                             "schedule": schedule.state_dict(), "step": step, "history": history,
                             "rng": torch.get_rng_state()})


def _restore(state: dict, folder: Path, student, optimizer, schedule) -> tuple[int, list[dict]]:
    """Load a checkpoint's state into the run; (step, history) to continue from."""
    try:
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        step, history = int(state["step"]), list(state["history"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise SlimError(f"the checkpoint in {folder} does not fit this run ({str(e).splitlines()[0][:200]}); "
                        "start again without --resume") from None
    return step, history


def _write_history(folder: Path, history: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # the plot needs the 'report' extra; history.json has the numbers
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss", lw=1)
    evals = [h for h in history if "eval_loss" in h]
    if evals:
        ax.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=120)
    plt.close(fig)
