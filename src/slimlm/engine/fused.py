"""The decoder's fused CPU op set: one token per sequence with the glue between the weight matmuls
(residual add + RMSNorm, RoPE + KV-cache write + attention, SiLU·up) in C++ (`csrc/decode_ops.cpp`,
compiled at first use); q/k/v and gate/up go through the plan's projections, which run them in one
kernel call where the layers' kernel can.

Why: on a 1.1B model at batch 1 a decode step on PyTorch ops issued ~600 small ops (norms, RoPE,
index_put, softmax, casts) costing 5-8 ms of a 23 ms int4 step, while the weights took ~15 ms
(benchmarks/engine_speed.py). Here a layer is about eight calls.

`FusedOps.build(plan, cache)` says whether the fused step can run this model (float32/bfloat16,
an unquantized cache, a compiler, and norms that are Llama's RMSNorm, checked numerically against
the model's own modules); otherwise the engine decodes with the PyTorch op set, which is also the
oracle the tests compare this one with. Tensors here are rows: hidden (B, C), heads (B, H·D).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from slimlm.core.cpp_ext import load_cpp
from slimlm.engine.decoder import Batch, DecoderPlan, DecoderSpec, LayerPlan
from slimlm.engine.kv_cache import KVCache

SOURCE = Path(__file__).parent / "csrc" / "decode_ops.cpp"


def ops():
    """The compiled glue ops, or None where they cannot be built here."""
    return load_cpp("slimlm_decode_ops", SOURCE, ("add_rms_norm", "silu_mul", "rope_attend"))


def _norm_eps(norm: nn.Module) -> float | None:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return float(eps) if isinstance(eps, (int, float)) and getattr(norm, "weight", None) is not None else None


@torch.no_grad()
def _is_rms_norm(norm: nn.Module, kernels, dtype: torch.dtype) -> bool:
    """The module computes Llama's RMSNorm (checked on random rows against its own forward)."""
    eps = _norm_eps(norm)
    if eps is None or norm.weight.dtype != dtype or norm.weight.dim() != 1:
        return False
    x = torch.randn(3, norm.weight.shape[0], generator=torch.Generator().manual_seed(0)).to(dtype) * 3
    tol = 0 if dtype == torch.bfloat16 else 1e-5
    return torch.allclose(kernels.add_rms_norm(x.clone(), None, norm.weight, eps), norm(x), rtol=tol, atol=tol)


# RoPE types whose tables depend on the position only (not on the sequence length, as "dynamic" and
# "longrope" do): their cos/sin are computed once for every cache position and looked up per step.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


class FusedOps:
    def __init__(self, spec: DecoderSpec, cache: KVCache, kernels, eps: dict[nn.Module, float]) -> None:
        self.spec, self.cache, self.kernels, self.eps = spec, cache, kernels, eps
        self._rope: tuple[Tensor, Tensor] | None = None  # cos, sin (max_len, R) for a static RoPE type

    def _rope_rows(self, plan: DecoderPlan, h: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin (B, R) of each row's position: the model's own rotary module, run once for all cache
        positions where its type allows (the same numbers: each position's angles are computed alone),
        else every step (~0.3 ms of a 1.1B model's step on PyTorch ops)."""
        if getattr(plan.rotary, "rope_type", None) not in STATIC_ROPE:
            cos, sin = plan.rotary(h[:, None], positions)  # (B, 1, R)
            return cos[:, 0].contiguous(), sin[:, 0].contiguous()
        if self._rope is None or self._rope[0].dtype != h.dtype:
            every = torch.arange(self.cache.max_len, device=h.device)[None]
            cos, sin = plan.rotary(h[:1, None], every)  # (1, max_len, R)
            self._rope = (cos[0].contiguous(), sin[0].contiguous())
        index = positions[:, 0]
        return self._rope[0].index_select(0, index), self._rope[1].index_select(0, index)

    @classmethod
    def build(cls, plan: DecoderPlan, cache: KVCache) -> tuple["FusedOps | None", str]:
        """The fused op set for this plan, or (None, why not)."""
        dtype = cache.dtype
        if cache.quantized:
            return None, "the KV cache is quantized"
        if dtype not in (torch.float32, torch.bfloat16) or cache.k[0].device.type != "cpu":
            return None, f"the fused step runs float32/bfloat16 on CPU, not {dtype} on {cache.k[0].device}"
        kernels = ops()
        if kernels is None:
            return None, "the C++ decode ops are not available (no compiler, or SLIMLM_NO_CPP)"
        if plan.spec.head_dim % 2:
            return None, "odd head dimension"
        norms = [n for layer in plan.layers for n in (layer.input_norm, layer.post_norm)]
        norms += [plan.norm] if plan.norm is not None else []
        if not all(_is_rms_norm(n, kernels, dtype) for n in norms):
            return None, "a norm is not Llama's RMSNorm"
        return cls(plan.spec, cache, kernels, {n: _norm_eps(n) for n in norms}), ""

    def begin(self, plan: DecoderPlan, batch: Batch) -> tuple[Tensor, tuple[Tensor, Tensor, Batch]]:
        if plan.embed is not None:
            h = plan.embed(batch.ids[:, 0]).contiguous()  # (B, C); updated in place by the residual adds
        else:
            h = batch.hidden[:, 0].contiguous()  # a later pipeline stage's input
        cos, sin = self._rope_rows(plan, h, batch.positions)
        return h, (cos, sin, batch)

    def add_norm(self, h: Tensor, delta: Tensor | None, norm: nn.Module) -> tuple[Tensor, Tensor]:
        return h, self.kernels.add_rms_norm(h, delta, norm.weight, self.eps[norm])  # h += delta; x = norm(h)

    def project_qkv(self, layer: LayerPlan, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, H·D), k, v (B, Hkv·D) of normed rows x (B, C), QK-norm applied (Qwen3)."""
        d, b = self.spec.head_dim, x.shape[0]
        q, k, v = layer.qkv(x)
        if layer.q_norm is not None:
            q, k = layer.q_norm(q.view(b, -1, d)).reshape(b, -1), layer.k_norm(k.view(b, -1, d)).reshape(b, -1)
        return q.contiguous(), k.contiguous(), v.contiguous()

    def attend(self, index: int, layer: LayerPlan, q: Tensor, k: Tensor, v: Tensor, ctx) -> Tensor:
        cos, sin, batch = ctx
        return self.kernels.rope_attend(q, k, v, cos, sin, self.cache.k[index], self.cache.v[index], batch.tables,
                                        batch.positions[:, 0], layer.window or 0, self.spec.scaling)  # (B, H·D)

    def mlp(self, layer: LayerPlan, x: Tensor) -> Tensor:
        gate, up = layer.gate_up(x)
        return layer.down_proj(self.kernels.silu_mul(gate, up))

    def hidden(self, h: Tensor, delta: Tensor, ctx) -> Tensor:
        return h.add_(delta)[:, None]  # (B, 1, C)

    def logits(self, plan: DecoderPlan, h: Tensor, delta: Tensor, ctx) -> Tensor:
        pick = ctx[2].pick
        if pick is not None:  # a mixed step: only each sequence's last row goes through the head
            h, delta = h.index_select(0, pick), delta.index_select(0, pick)
        return plan.head(self.kernels.add_rms_norm(h, delta, plan.norm.weight, self.eps[plan.norm]))  # (B, V)
