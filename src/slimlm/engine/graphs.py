"""CUDA-graph decode for the engine: on a GPU a small model's decode step is bound by kernel launches
(~25 per layer from Python; the H200 ran a 1.1B bf16 model at 50 tokens/s at batch 1 that way), so
the step for slots 0..B-1 is captured once as a CUDA graph and replayed.

A graph needs fixed shapes and no host synchronisation, so `StaticOps` (the decoder's static-shape
op set) attends over the whole cache (max_len keys) with a mask built on the device from each row's
position, and writes the new keys and values with device-side indices. It is plain PyTorch and runs
on any device: the tests check it against the dynamic step on CPU; capturing needs CUDA.
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
    masks: dict  # sliding window -> mask (B, 1, 1, max_len)


class StaticOps(TorchOps):
    """One token per slot 0..B-1; shapes depend only on B and the cache size."""

    def begin(self, plan: DecoderPlan, batch: Batch) -> tuple[Tensor, StaticContext]:
        h = plan.embed(batch.ids) if plan.embed is not None else batch.hidden  # (B, 1, C)
        cos, sin = plan.rotary(h, batch.positions)  # (B, 1, R)
        return h, StaticContext(batch, cos, sin, self.cache.static_index(batch.positions[:, 0]), {})

    def attend(self, index: int, layer: LayerPlan, q: Tensor, k: Tensor, v: Tensor, ctx: StaticContext) -> Tensor:
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)  # (B, H, 1, D)
        self.cache.write_static(index, ctx.index, k, v)
        if layer.window not in ctx.masks:
            at = ctx.batch.positions  # (B, 1)
            keys = torch.arange(self.cache.max_len, device=at.device)[None, :]  # (1, L)
            mask = keys <= at
            if layer.window is not None:
                mask &= keys > at - layer.window
            ctx.masks[layer.window] = mask[:, None, None]  # (B, 1, 1, L)
        b = q.shape[0]
        out = decode_attention(q, self.cache.k[index][:b], self.cache.v[index][:b], ctx.masks[layer.window],
                               self.spec.scaling)
        return out.transpose(1, 2).reshape(b, 1, -1)  # (B, 1, H·D)


def static_decode(plan: DecoderPlan, ops: StaticOps, tokens: Tensor, positions: Tensor) -> Tensor:
    """One token per slot for slots 0..B-1: tokens, positions (B,) on the model's device; logits (B, V)."""
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    return forward(plan, ops, Batch(tokens[:, None], positions[:, None], rows, contiguous=True))


class GraphedDecode:
    """Replays a captured `static_decode` for a fixed batch of slots 0..B-1 (CUDA only)."""

    def __init__(self, plan: DecoderPlan, cache: KVCache, batch: int) -> None:
        device = cache.k[0].device
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        ops = StaticOps(plan.spec, cache)
        args = (plan, ops, self.tokens, self.positions)
        # Warm up on a side stream (kernels choose and repack their state), then capture. The warm-up
        # writes keys at the last position of each slot: beyond every sequence held now, so never read
        # before a real step writes it.
        self.positions.fill_(cache.max_len - 1)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                static_decode(*args)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = static_decode(*args)

    def __call__(self, tokens: Tensor, positions: Tensor) -> Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.logits.clone()
