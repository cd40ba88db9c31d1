"""Running a distributed engine from one process: rank 0 drives, the other ranks follow.

Rank 0 (where the user's command, the generation loop or the server's scheduler runs) holds a
`RemoteEngine` with the `Engine` API (prefill, append, decode, release, reuse_prefix, truncate and
what the scheduler reads: lengths, max_len, the cache's blocks). Every call
is broadcast to the other ranks as a small int64 command (an op code, the engine's id, a few
integers, then the token ids), and every rank runs it on its own part of the model, meeting in the
collectives inside the step (tensor parallelism) or passing activations on (pipeline parallelism).
The other ranks sit in `follow`, which runs the commands until rank 0 says stop, so the same code
serves `torchrun --nproc-per-node N -m slimlm ...` and `slimlm ... --tp N` (which starts its own
workers).
"""

from __future__ import annotations

import itertools
from typing import Callable

import torch
from torch import Tensor

CREATE, APPEND, DECODE, RELEASE, DROP, STOP, REUSE, TRUNCATE, EXTEND = range(9)
HEADER = 9  # op, engine id, up to 6 integers, the payload's length


class Channel:
    """Commands from rank 0 to every rank, as two broadcasts (a fixed header, then the payload)."""

    def __init__(self, group=None) -> None:
        self.group = group

    def send(self, op: int, engine: int, ints: tuple[int, ...] = (), payload: Tensor | None = None) -> None:
        import torch.distributed as dist

        from slimlm.core.errors import SlimError

        n = 0 if payload is None else payload.numel()
        header = torch.tensor([op, engine, *ints, *([0] * (HEADER - 3 - len(ints))), n], dtype=torch.long)
        try:
            dist.broadcast(header, 0, group=self.group)
            if n:
                dist.broadcast(payload.to(torch.long).reshape(-1).cpu().contiguous(), 0, group=self.group)
        except RuntimeError as e:  # gloo/NCCL: a peer went away
            raise SlimError(f"a worker process of the parallel group stopped ({str(e).splitlines()[0][:160]}); "
                            "see its error above") from None

    def receive(self) -> tuple[int, int, list[int], Tensor | None]:
        import torch.distributed as dist

        header = torch.empty(HEADER, dtype=torch.long)
        dist.broadcast(header, 0, group=self.group)
        op, engine, *ints, n = header.tolist()
        payload = None
        if n:
            payload = torch.empty(n, dtype=torch.long)
            dist.broadcast(payload, 0, group=self.group)
        return op, engine, ints, payload


# (slots, max_len, kv_dtype, block_size=, kv_tokens=, prefix_caching=) -> an engine on this rank's part
EngineFactory = Callable[..., object]
KV_CODES = {"auto": 0, "int8": 1}


class RemoteEngine:
    """Rank 0's handle of an engine that every rank of the group runs its part of."""

    _ids = itertools.count(1)

    def __init__(self, channel: Channel, factory: EngineFactory, slots: int = 1, max_len: int | None = None,
                 kv_dtype: str = "auto", block_size: int = 16, kv_tokens: int | None = None,
                 prefix_caching: bool = False) -> None:
        self.channel, self.id = channel, next(self._ids)
        paging = dict(block_size=block_size, kv_tokens=kv_tokens, prefix_caching=prefix_caching)
        self.local = factory(slots, max_len, kv_dtype, **paging)  # first: bad settings fail here, not on the ranks
        channel.send(CREATE, self.id, (slots, max_len or 0, KV_CODES[kv_dtype], block_size, kv_tokens or 0,
                                       int(prefix_caching)))

    # the Engine API, forwarded
    @property
    def lengths(self) -> Tensor:
        return self.local.lengths

    @property
    def max_len(self) -> int:
        return self.local.max_len

    @property
    def decode_ops(self) -> str:
        return self.local.decode_ops

    def __getattr__(self, name: str):
        """What the scheduler reads of the cache (capacity, block_size, pool, blocks_for, cached_tokens):
        rank 0's engine holds the same books as every rank's."""
        if name in ("capacity", "block_size", "pool", "blocks_for", "cached_tokens", "cached_length"):
            return getattr(self.local, name)
        raise AttributeError(name)

    def prefill(self, slot: int, ids: Tensor) -> Tensor:
        self.release(slot)
        return self.append(slot, ids)

    def append(self, slot: int, ids: Tensor, all_logits: bool = False, read_back: bool = False) -> Tensor:
        self.channel.send(APPEND, self.id, (slot, int(all_logits), int(read_back)), ids)
        return self.local.append(slot, ids, all_logits=all_logits, read_back=read_back)

    def decode(self, slots: Tensor, tokens: Tensor) -> Tensor:
        self.channel.send(DECODE, self.id, (), torch.cat([slots.reshape(-1).cpu(), tokens.reshape(-1).cpu()]))
        return self.local.decode(slots, tokens)

    def extend(self, slots: Tensor, ids: Tensor) -> Tensor:
        """Several tokens of several sequences in one forward (tensor parallelism: every rank's engine has it)."""
        if not hasattr(self.local, "extend"):
            raise AttributeError("extend")
        b, t = ids.shape
        self.channel.send(EXTEND, self.id, (b, t), torch.cat([slots.reshape(-1).cpu(), ids.reshape(-1).cpu()]))
        return self.local.extend(slots, ids)

    def reuse_prefix(self, slot: int, ids: list[int]) -> int:
        self.channel.send(REUSE, self.id, (slot,), torch.tensor(ids, dtype=torch.long))
        return self.local.reuse_prefix(slot, ids)

    def truncate(self, slot: int, length: int) -> None:
        self.channel.send(TRUNCATE, self.id, (slot, length))
        self.local.truncate(slot, length)

    def release(self, slot: int) -> None:
        self.channel.send(RELEASE, self.id, (slot,))
        self.local.release(slot)

    def close(self) -> None:
        self.channel.send(DROP, self.id)


def follow(channel: Channel, factory: EngineFactory) -> None:
    """Ranks > 0: run rank 0's commands on this rank's part of the model until it sends STOP."""
    from slimlm.core.errors import SlimError

    engines: dict[int, object] = {}
    codes = {v: k for k, v in KV_CODES.items()}
    while True:
        op, engine_id, ints, payload = channel.receive()
        if op == STOP:
            return
        try:
            _run(op, engine_id, ints, payload, engines, factory, codes)
        except SlimError:
            pass  # rank 0 ran the same checks on the same inputs and reports the error to the user


def _run(op: int, engine_id: int, ints: list[int], payload: Tensor | None, engines: dict, factory: EngineFactory,
         codes: dict) -> None:
    if op == CREATE:
        engines[engine_id] = factory(ints[0], ints[1] or None, codes[ints[2]], block_size=ints[3],
                                     kv_tokens=ints[4] or None, prefix_caching=bool(ints[5]))
    elif op == DROP:
        engines.pop(engine_id, None)
    elif op == APPEND:
        engines[engine_id].append(ints[0], payload, all_logits=bool(ints[1]), read_back=bool(ints[2]))
    elif op == DECODE:
        half = payload.numel() // 2
        engines[engine_id].decode(payload[:half], payload[half:])
    elif op == RELEASE:
        engines[engine_id].release(ints[0])
    elif op == REUSE:
        engines[engine_id].reuse_prefix(ints[0], payload.tolist() if payload is not None else [])
    elif op == TRUNCATE:
        engines[engine_id].truncate(ints[0], ints[1])
    elif op == EXTEND:
        b, t = ints[0], ints[1]
        engines[engine_id].extend(payload[:b], payload[b:].reshape(b, t))


def stop(channel: Channel) -> None:
    channel.send(STOP, 0)
