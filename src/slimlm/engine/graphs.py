"""CUDA-graph decode for the engine: on a GPU a small model's decode step is bound by kernel launches
(~25 per layer from Python; the H200 ran a 1.1B bf16 model at 50 tokens/s at batch 1 that way), so
decode steps are captured once as CUDA graphs and replayed.

A graph needs fixed shapes and no host synchronisation, so `StaticOps` (the decoder's static-shape
op set) attends over each row's whole block table (max_len keys, gathered from the paged cache) with a
mask built on the device from each row's position, and writes the new keys and values with
device-side indices. Block tables, positions and tokens are copied into the graph's input buffers
before each replay. One `StaticStep` per bucket of
batch sizes (1, 2, 4, ..., slots) runs cache rows 0..B-1 and any subset of them, so the server's
continuous batching, whose active set changes every step, replays graphs too: the engine keeps the
sequences it holds in the lowest cache rows (`Engine.release` moves the last one into a freed row).
It is plain PyTorch and runs on any device: the tests check it against the dynamic step on CPU;
capturing needs CUDA.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from slimlm.engine.decoder import Batch, DecoderPlan, LayerPlan, forward
from slimlm.engine.kv_cache import KVCache
from slimlm.engine.torch_ops import TorchOps, apply_rope, decode_attention


@dataclasses.dataclass
class StaticContext:
    batch: Batch
    cos: Tensor  # (B, 1, R)
    sin: Tensor
    index: tuple[Tensor, Tensor, Tensor]  # where each slot's new key goes (`KVCache.static_index`)
    masks: dict  # sliding window -> mask (B, 1, 1, L), L = max_blocks * block_size


class StaticOps(TorchOps):
    """One token per slot 0..B-1; shapes depend only on B and the cache size."""

    def begin(self, plan: DecoderPlan, batch: Batch) -> tuple[Tensor, StaticContext]:
        h = plan.embed(batch.ids) if plan.embed is not None else batch.hidden  # (B, 1, C)
        cos, sin = plan.rotary(h, batch.positions)  # (B, 1, R)
        return h, StaticContext(batch, cos, sin, self.cache.static_index(batch.tables, batch.positions[:, 0]), {})

    def attend(self, index: int, layer: LayerPlan, q: Tensor, k: Tensor, v: Tensor, ctx: StaticContext) -> Tensor:
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)  # (B, H, 1, D)
        self.cache.write_static(index, ctx.index, k, v)
        if layer.window not in ctx.masks:
            at = ctx.batch.positions  # (B, 1)
            keys = torch.arange(self.cache.max_blocks * self.cache.block_size, device=at.device)[None, :]  # (1, L)
            mask = keys <= at
            if layer.window is not None:
                mask &= keys > at - layer.window
            ctx.masks[layer.window] = mask[:, None, None]  # (B, 1, 1, L)
        b, length = q.shape[0], self.cache.max_blocks * self.cache.block_size
        keys, values = self.cache.read(index, ctx.batch.tables, length)  # (B, Hkv, L, D)
        out = decode_attention(q, keys, values, ctx.masks[layer.window], self.spec.scaling)
        return out.transpose(1, 2).reshape(b, 1, -1)  # (B, 1, H·D)


def static_decode(plan: DecoderPlan, ops: StaticOps, tokens: Tensor, positions: Tensor, tables: Tensor) -> Tensor:
    """One token per row for rows with block tables (B, max_blocks): tokens, positions (B,) on the
    model's device; logits (B, V)."""
    return forward(plan, ops, Batch(tokens[:, None], positions[:, None], tables))


def buckets(slots: int) -> list[int]:
    """Batch sizes with a static step of their own: powers of two below `slots`, and `slots`."""
    sizes, b = [], 1
    while b < slots:
        sizes.append(b)
        b *= 2
    return sizes + [slots]


class StaticStep:
    """The decode step of cache rows 0..B-1 (B a bucket from `buckets`) for any subset of them: the rows
    that do not decode this step feed token 0 at the scratch position max_len - 1, whose key no sequence
    reads before writing it itself (a sequence reaches that position only by decoding its last token;
    a row whose table has no block there writes into the null block, which is only read masked).
    graph: capture it once as a CUDA graph and replay it (CUDA only); else run it eagerly, the same ops
    (how the tests check the captured step's logic on CPU)."""

    def __init__(self, plan: DecoderPlan, cache: KVCache, bucket: int, graph: bool) -> None:
        device = cache.k[0].device
        self.bucket, self.scratch = bucket, cache.max_len - 1
        self.tokens = torch.zeros(bucket, dtype=torch.long, device=device)
        self.positions = torch.full((bucket,), self.scratch, dtype=torch.long, device=device)
        self.tables = torch.zeros(bucket, cache.max_blocks, dtype=torch.long, device=device)  # null blocks
        self.args = (plan, StaticOps(plan.spec, cache), self.tokens, self.positions, self.tables)
        self.graph = None
        if graph:
            # Warm up on a side stream (kernels choose and repack their state), then capture; the
            # warm-up writes only scratch positions.
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    static_decode(*self.args)
            torch.cuda.current_stream(device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = static_decode(*self.args)

    def __call__(self, rows: Tensor, tokens: Tensor, held: Tensor, tables: Tensor) -> Tensor:
        """Logits (b, V) of rows (b,) (host) feeding tokens (b,) at positions held (b,) (host); tables
        (bucket, max_blocks) (host): the block tables of rows 0..bucket-1."""
        device, b, n = self.tokens.device, len(rows), self.tables.numel()
        positions = torch.full((self.bucket,), self.scratch, dtype=torch.long)
        positions[rows] = held
        host = [positions, tables.reshape(-1), rows] + ([tokens.long()] if tokens.device.type == "cpu" else [])
        packed = torch.cat(host)
        if device.type == "cuda":  # pinned and asynchronous: the step never waits for the host
            packed = packed.pin_memory().to(device, non_blocking=True)
        rows_on = packed[self.bucket + n:self.bucket + n + b]
        tokens = packed[self.bucket + n + b:] if len(host) == 4 else tokens
        self.positions.copy_(packed[:self.bucket])
        self.tables.copy_(packed[self.bucket:self.bucket + n].view_as(self.tables))
        self.tokens.zero_()
        self.tokens.index_copy_(0, rows_on, tokens)
        if self.graph is None:
            logits = static_decode(*self.args)
        else:
            self.graph.replay()
            logits = self.logits
        return logits.index_select(0, rows_on)
