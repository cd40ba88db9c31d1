"""Starting a model across processes: `open_model(path, ParallelConfig(tp=2))` loads this process's part
(rank 0), starts the other ranks (or joins torchrun's), and returns rank 0's model with a
`ParallelGroup` attached (`model.slimlm_parallel`), through which generate, bench and serve build
their engines (`RemoteEngine`s every rank runs). Rank 0's model is a shard: its own forward would be
wrong, so it refuses to run.
"""

from __future__ import annotations

import atexit
from typing import Any

import torch
from torch import nn

from slimlm.core.errors import SlimError
from slimlm.parallel import driver
from slimlm.parallel.group import ParallelConfig, check_devices, join, start_workers, under_torchrun


class ParallelGroup:
    """The processes one model runs on, seen from rank 0."""

    def __init__(self, config: ParallelConfig, factory: driver.EngineFactory, workers: Any = None) -> None:
        self.config, self.factory, self.workers = config, factory, workers
        self.channel = driver.Channel()
        self.closed = False
        atexit.register(self.close)

    def engine(self, slots: int = 1, max_len: int | None = None, kv_dtype: str = "auto",
               **paging) -> driver.RemoteEngine:
        """paging: block_size, kv_tokens, prefix_caching (as `Engine`)."""
        if self.closed:
            raise SlimError("the parallel group is closed; load the model again")
        return driver.RemoteEngine(self.channel, self.factory, slots, max_len, kv_dtype, **paging)

    def close(self) -> None:
        """Stop the other ranks and leave the group (also at exit)."""
        if self.closed:
            return
        self.closed = True
        import torch.distributed as dist

        try:
            driver.stop(self.channel)
            dist.barrier()  # nobody leaves the group while another still uses it
        except (RuntimeError, SlimError):
            pass  # a worker already stopped: there is nobody to wait for
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            if self.workers is not None:
                try:
                    self.workers.join()
                except Exception:  # noqa: BLE001 - a worker that failed has printed its error
                    pass


def _exit_now(code: int) -> None:
    """End a worker without running the C++ destructors of threads still parked in torch's and the C++
    extensions' pools (which abort a process that exits with them joinable: SIGABRT)."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _refuse_forward(*args, **kwargs):
    raise SlimError("this model is one rank's shard of a parallel model; run it through slimlm's engine "
                    "(generate, bench, serve), or load it without --tp/--pp for evaluation")


class CommTimer:
    """Seconds this process spent in the collectives of the decoder's steps (what the benchmark reports)."""

    def __init__(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        import time

        import torch.distributed as dist

        t0 = time.perf_counter()
        dist.all_reduce(x)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return x


def tp_factory(path: str, config: ParallelConfig, rank: int, dtype, device: str):
    """(this rank's shard, tokenizer, engine factory) for tensor parallelism."""
    from slimlm.engine.engine import Engine
    from slimlm.parallel.loading import load_tp_shard

    timer = CommTimer()
    model, tokenizer, layout, spec = load_tp_shard(path, config.tp, rank, dtype, device, config.split_head, timer)
    model.slimlm_comm = timer

    def factory(slots: int, max_len: int | None, kv_dtype: str, **paging):
        return Engine(model, slots, max_len, kv_dtype, spec=spec, reduce=timer.all_reduce, **paging)

    return model, tokenizer, factory


def _worker(rank: int, world: int, address: str, path: str, config: ParallelConfig, dtype, device: str) -> None:
    """Ranks > 0 started by `open_model`: load this rank's part, then follow rank 0."""
    import torch.distributed as dist

    code = 1
    try:
        join(world, rank, device, init_method=address)
        _, _, factory = _factory(config)(path, config, rank, dtype, device)
        driver.follow(driver.Channel(), factory)
        dist.barrier()
        code = 0
    except BaseException:  # noqa: BLE001 - shown here; rank 0 sees the group break and reports it
        import traceback

        traceback.print_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        _exit_now(code)


def _check(config: ParallelConfig):
    if config.pp > 1:
        from slimlm.parallel.pipeline import check_pp

        return check_pp
    from slimlm.parallel.loading import check_tp

    return check_tp


def _factory(config: ParallelConfig):
    if config.pp > 1:
        from slimlm.parallel.pipeline import pp_factory

        return pp_factory
    return tp_factory


def open_model(path: str, config: ParallelConfig, dtype=None, device: str = "cpu") -> tuple[nn.Module, Any]:
    """(rank 0's model with `slimlm_parallel` attached, tokenizer). Under torchrun every process calls
    this; ranks > 0 then follow rank 0 until it closes the group, and exit."""
    world = config.world
    check_devices(world, device)
    _check(config)(path, config)
    workers = None
    if under_torchrun():
        rank = join(world, device=device)
    else:
        address, workers = start_workers(world, _worker, (path, config, dtype, device))
        rank = join(world, 0, device, init_method=address)
    model, tokenizer, factory = _factory(config)(path, config, rank, dtype, device)
    if rank != 0:
        import torch.distributed as dist

        driver.follow(driver.Channel(), factory)
        dist.barrier()
        dist.destroy_process_group()
        _exit_now(0)
    model.slimlm_parallel = ParallelGroup(config, factory, workers)
    model.forward = _refuse_forward
    return model, tokenizer
