"""A preallocated key/value cache for the engine's decoder: one (slots, kv_heads, max_len, head_dim)
buffer per layer for keys and one for values, where a slot holds one sequence.

`dtype="int8"` stores keys and values as symmetric int8 with one scale per (slot, head, position),
the per-token scheme of KIVI-style and vLLM's int8/fp8 KV caches (e.g. Hooper et al., "KVQuant",
arXiv 2401.18079, and Liu et al., "KIVI", arXiv 2402.02750, which study per-channel keys; per-token
scales are what a cache that is appended one token at a time can compute without a calibration
pass). It halves the cache against bfloat16 (quarters it against float32) plus 2/head_dim for the
float16 scales; `dequantized` reads return the compute dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimlm.core.errors import SlimError
from slimlm.core.memory import check_fits


def quantize_heads(x: Tensor) -> tuple[Tensor, Tensor]:
    """int8 codes (..., D) and float16 scales (..., 1) of x (..., D), one scale per vector; the codes
    are computed with the rounded scale, so codes · scale is the stored value."""
    scale = (x.float().abs().amax(-1, keepdim=True) / 127).clamp(min=1e-6).to(torch.float16)
    return torch.round(x.float() / scale.float()).clamp(-127, 127).to(torch.int8), scale


class KVCache:
    def __init__(self, n_layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", quantized: bool = False) -> None:
        self.n_layers, self.slots, self.max_len, self.dtype, self.quantized = n_layers, slots, max_len, dtype, quantized
        shape = (slots, kv_heads, max_len, head_dim)
        store = torch.int8 if quantized else dtype
        per_token = 2 * n_layers * kv_heads * (head_dim * store.itemsize + (2 if quantized else 0))
        check_fits(per_token * slots * max_len, f"a KV cache of {slots} sequences x {max_len} tokens",
                   "use fewer sequences (--slots, --batch-sizes) or shorter ones (--max-len)", torch.device(device))
        self.k = [torch.zeros(shape, dtype=store, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=store, device=device) for _ in range(n_layers)]
        if quantized:
            scale_shape = (slots, kv_heads, max_len, 1)
            self.k_scale = [torch.zeros(scale_shape, dtype=torch.float16, device=device) for _ in range(n_layers)]
            self.v_scale = [torch.zeros(scale_shape, dtype=torch.float16, device=device) for _ in range(n_layers)]

    def nbytes(self) -> int:
        tensors = self.k + self.v + (self.k_scale + self.v_scale if self.quantized else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def check_room(self, length: int) -> None:
        """Refuse a sequence of `length` tokens where a slot holds fewer (the one bounds check: callers
        know their lengths on the host, so writes never read positions back from the device)."""
        if length > self.max_len:
            raise SlimError(f"sequence of {length} tokens is longer than the KV cache ({self.max_len} tokens per "
                            "sequence); raise max_len or shorten the prompt")

    def write(self, layer: int, rows: Tensor, positions: Tensor, k: Tensor, v: Tensor) -> None:
        """Store k, v (B, kv_heads, T, D) of slots `rows` (B,) at `positions` (B, T) (checked by `check_room`)."""
        b = rows[:, None].expand_as(positions)  # (B, T)
        for store, scales, x in ((self.k, getattr(self, "k_scale", None), k), (self.v, getattr(self, "v_scale", None), v)):
            x = x.transpose(1, 2)  # (B, T, H, D): indexed by (slot, position)
            if self.quantized:
                codes, scale = quantize_heads(x)
                store[layer].transpose(1, 2)[b, positions] = codes
                scales[layer].transpose(1, 2)[b, positions] = scale
            else:
                store[layer].transpose(1, 2)[b, positions] = x.to(self.dtype)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` tokens of slot row `src` into row `dst` (the engine keeps its sequences in
        the lowest rows, one copy per finished sequence; a shared prompt prefix is copied, not recomputed)."""
        stores = self.k + self.v + (self.k_scale + self.v_scale if self.quantized else [])
        for t in stores:
            t[dst, :, :length] = t[src, :, :length]

    def static_index(self, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Indices (slot, head, position) for `write_static` of slots 0..B-1 at positions (B,), built on
        the device: nothing syncs with the host, so a step using them can be captured in a CUDA graph."""
        b, heads = positions.shape[0], self.k[0].shape[1]
        rows = torch.arange(b, device=positions.device)[:, None]  # (B, 1)
        return rows, torch.arange(heads, device=positions.device)[None, :], positions[:, None].expand(b, heads)

    def write_static(self, layer: int, index: tuple[Tensor, Tensor, Tensor], k: Tensor, v: Tensor) -> None:
        """Store one token's k, v (B, kv_heads, 1, D) per slot at `static_index` (unquantized cache only)."""
        self.k[layer].index_put_(index, k[:, :, 0].to(self.dtype))  # (B, Hkv, D) at each row's position
        self.v[layer].index_put_(index, v[:, :, 0].to(self.dtype))

    def read(self, layer: int, rows: Tensor, length: int, contiguous_rows: bool) -> tuple[Tensor, Tensor]:
        """Keys and values (B, kv_heads, length, D) of slots `rows` in the compute dtype."""
        def take(t: Tensor) -> Tensor:
            t = t[: len(rows)] if contiguous_rows else t.index_select(0, rows)
            return t[:, :, :length]

        k, v = take(self.k[layer]), take(self.v[layer])
        if self.quantized:
            k = (k.to(torch.float32) * take(self.k_scale[layer]).float()).to(self.dtype)
            v = (v.to(torch.float32) * take(self.v_scale[layer]).float()).to(self.dtype)
        return k, v
