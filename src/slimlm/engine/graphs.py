"""CUDA-graph decode for the engine: on a GPU a small model's decode step is bound by kernel launches
(~25 per layer from Python; the H200 ran a 1.1B bf16 model at 50 tokens/s at batch 1 that way), so
the step for slots 0..B-1 is captured once as a CUDA graph and replayed.

A graph needs fixed shapes and no host synchronisation, so `static_decode` attends over the whole
cache (max_len keys) with a mask built on the device from each row's position, and writes the new
keys and values with device-side indices. It is plain PyTorch and runs on any device: the tests
check it against the engine's dynamic step on CPU; capturing needs CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimlm.engine.decoder import _mlp, _project_qkv, apply_rope, decode_attention
from slimlm.engine.kv_cache import KVCache


@torch.no_grad()
def static_decode(model: nn.Module, spec, tokens: Tensor, positions: Tensor, cache: KVCache) -> Tensor:
    """One token per slot for slots 0..B-1: tokens, positions (B,) on the model's device; returns
    logits (B, V). Shapes depend only on B and the cache size."""
    base = model.model
    b = tokens.shape[0]
    h = base.embed_tokens(tokens[:, None])  # (B, 1, C)
    cos, sin = base.rotary_emb(h, positions[:, None])  # (B, 1, R)
    keys_at = torch.arange(cache.max_len, device=tokens.device)  # (L,)
    rows = torch.arange(b, device=tokens.device)[:, None]  # (B, 1)
    heads = torch.arange(spec.n_kv_heads, device=tokens.device)[None, :]  # (1, Hkv)
    at = positions[:, None].expand(b, spec.n_kv_heads)  # (B, Hkv)
    masks: dict[int | None, Tensor] = {}
    for i, layer in enumerate(base.layers):
        attn = layer.self_attn
        q, k, v = _project_qkv(spec, attn, layer.input_layernorm(h))  # (B, H, 1, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.k[i].index_put_((rows, heads, at), k[:, :, 0].to(cache.dtype))  # (B, Hkv, D) at each row's position
        cache.v[i].index_put_((rows, heads, at), v[:, :, 0].to(cache.dtype))
        window = spec.windows[i]
        if window not in masks:
            mask = keys_at[None, :] <= positions[:, None]  # (B, L)
            if window is not None:
                mask &= keys_at[None, :] > positions[:, None] - window
            masks[window] = mask[:, None, None]  # (B, 1, 1, L)
        out = decode_attention(q, cache.k[i][:b], cache.v[i][:b], masks[window], spec.scaling)
        h = h + attn.o_proj(out.transpose(1, 2).reshape(b, 1, -1))
        h = h + _mlp(spec, layer.mlp, layer.post_attention_layernorm(h))
    return model.lm_head(base.norm(h))[:, -1]


class GraphedDecode:
    """Replays a captured `static_decode` for a fixed batch of slots 0..B-1 (CUDA only)."""

    def __init__(self, model: nn.Module, spec, cache: KVCache, batch: int) -> None:
        device = cache.k[0].device
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        args = (model, spec, self.tokens, self.positions, cache)
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
