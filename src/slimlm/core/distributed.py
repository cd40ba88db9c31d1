"""Calibration across processes: under torch.distributed (e.g. `torchrun --nproc-per-node N -m slimlm
quantize ...`) each process takes its share of the calibration windows, and the statistics calibrated
methods collect are combined across processes before they are used, so every process ends with the
model one process would make (the same codes, up to floating-point summation order).

Outside a process group every function here is the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def my_share(samples: Tensor, batch_size: int = 1) -> Tensor:
    """This process's calibration windows (n, T): the batches of `batch_size` windows numbered rank,
    rank + world, ... (so global batch g = rank + world * i is this process's i-th batch)."""
    rank, world = rank_and_world()
    if world == 1:
        return samples
    batches = samples.split(batch_size)
    if len(batches) < world:
        from slimlm.core.errors import SlimError

        raise SlimError(f"{len(batches)} calibration batches cannot be shared by {world} processes; raise --n-samples")
    return torch.cat(batches[rank::world])


def global_batch(local: int) -> int:
    """The index, over all processes, of this process's `local`-th calibration batch (see `my_share`)."""
    rank, world = rank_and_world()
    return rank + world * local


def sum_(t: Tensor) -> Tensor:
    """t summed over the processes, in place."""
    _, world = rank_and_world()
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def max_(t: Tensor) -> Tensor:
    """t's elementwise maximum over the processes, in place."""
    _, world = rank_and_world()
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def mean_of(mean: Tensor, count: int) -> tuple[Tensor, int]:
    """A running mean over `count` rows here -> the mean over every process's rows, and their number."""
    _, world = rank_and_world()
    if world == 1:
        return mean, count
    total = sum_(torch.tensor([float(count)], dtype=torch.float64, device=mean.device))
    combined = sum_(mean * count) / float(total)
    return combined, int(total)


def gather_rows(rows: Tensor) -> Tensor:
    """Every process's rows (n_p, K), concatenated in rank order (sizes may differ)."""
    _, world = rank_and_world()
    if world == 1:
        return rows
    import torch.distributed as dist

    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([rows.shape[0]], dtype=torch.long))
    most = int(max(s.item() for s in sizes))
    padded = torch.zeros(most, *rows.shape[1:], dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])
