"""Process groups on torch.distributed (gloo on CPU, NCCL on CUDA): joining the one torchrun made, or
starting our own worker processes so a user needs no launcher."""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
from typing import Any, Callable

import torch

from slimlm.core.config import Config, check, field
from slimlm.core.errors import SlimError

TIMEOUT = datetime.timedelta(minutes=10)  # a peer that stops answering fails the group after this


@dataclasses.dataclass(frozen=True)
class ParallelConfig(Config):
    """How a model is spread over processes (flags of serve, generate and bench)."""

    name = "parallel"
    tp: int = field(1, "tensor-parallel processes: each holds a slice of every layer (Megatron-style)")
    pp: int = field(1, "pipeline-parallel processes: each holds a run of layers")
    split_head: bool = field(True, "with --tp: split the output head along the vocabulary (each rank reads 1/tp of "
                                   "it, then the logits are gathered) instead of replicating it")
    micro_batches: int = field(0, "with --pp: micro-batches a decode step's sequences are split into (0: one per "
                                  "stage; more shrink the pipeline bubble but read each stage's weights once more each)")

    def __post_init__(self) -> None:
        for name in ("tp", "pp"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                  f"{name} {value!r} must be a whole number >= 1 (--{name})")
        check(isinstance(self.micro_batches, int) and self.micro_batches >= 0,
              f"micro_batches {self.micro_batches!r} must be a whole number >= 0")
        check(self.tp == 1 or self.pp == 1, "combine tensor and pipeline parallelism in one run is not supported yet; "
                                             "use --tp or --pp")

    @property
    def world(self) -> int:
        return self.tp * self.pp

    @property
    def parallel(self) -> bool:
        return self.world > 1


def backend(device: str) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def check_devices(world: int, device: str) -> None:
    """One CUDA device per rank (more ranks than devices is refused); CPU ranks share the cores."""
    if str(device).startswith("cuda"):
        count = torch.cuda.device_count()
        if world > count:
            raise SlimError(f"{world} processes need {world} CUDA devices and this machine has {count}; lower --tp/--pp")


def join(world: int, rank: int | None = None, device: str = "cpu", init_method: str | None = None) -> int:
    """Join the process group (torchrun's environment, or `init_method`); returns this process's rank."""
    import torch.distributed as dist

    if not dist.is_initialized():
        if under_torchrun():
            rank = int(os.environ["RANK"])
            if int(os.environ["WORLD_SIZE"]) != world:
                raise SlimError(f"torchrun started {os.environ['WORLD_SIZE']} processes and the layout needs {world}; "
                                f"start it with --nproc-per-node {world}")
        dist.init_process_group(backend(device), init_method=init_method, rank=rank, world_size=world, timeout=TIMEOUT)
    if str(device).startswith("cuda"):
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    return dist.get_rank()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, target: Callable, args: tuple, world: int, address: str, threads: int) -> None:
    torch.set_num_threads(threads)
    target(rank + 1, world, address, *args)


def start_workers(world: int, target: Callable[..., Any], args: tuple = (), threads: int | None = None):
    """Start ranks 1..world-1 as processes running target(rank, world, init address, *args); this process
    is rank 0 and joins with the returned address. Returns (address, the processes' context) — the
    context's `join()` waits for them. Workers split the CPU threads evenly with this process."""
    import torch.multiprocessing as mp

    address = f"tcp://127.0.0.1:{free_port()}"
    threads = threads or max(1, torch.get_num_threads() // world)
    context = mp.start_processes(_worker, args=(target, args, world, address, threads), nprocs=world - 1,
                                 join=False, start_method="spawn")
    torch.set_num_threads(threads)
    return address, context
