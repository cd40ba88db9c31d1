"""The engine's fused decode step: one token per sequence with the glue between the weight matmuls
(residual add + RMSNorm, RoPE + KV-cache write + attention, SiLU·up) in C++ (`csrc/decode_ops.cpp`,
compiled at first use) and q/k/v and gate/up each in one kernel call where the layers' kernel can
run several weights at once.

Why: on a 1.1B model at batch 1 a decode step on PyTorch ops issued ~600 small ops (norms, RoPE,
index_put, softmax, casts) costing 5-8 ms of a 23 ms int4 step, while the weights took ~15 ms
(benchmarks/engine_speed.py). Here a layer is about eight calls.

`fused_plan(model, spec, cache)` says whether the fused step can run this model (float32/bfloat16,
an unquantized cache, a compiler, and norms that are Llama's RMSNorm, checked numerically against
the model's own modules); otherwise the engine takes the PyTorch path in `decoder.py`, which is also
the oracle the tests compare this step with.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor, nn

from slimlm.core.cpp_ext import load_cpp
from slimlm.core.errors import SlimError
from slimlm.engine.kv_cache import KVCache

SOURCE = Path(__file__).parent / "csrc" / "decode_ops.cpp"


def ops():
    """The compiled glue ops, or None where they cannot be built here."""
    return load_cpp("slimlm_decode_ops", SOURCE, ("add_rms_norm", "silu_mul", "rope_attend"))


def linear_many(x: Tensor, layers: list[nn.Module]) -> list[Tensor]:
    """[layer(x) for layer in layers], in one kernel call when the layers are compressed layers whose
    kernel can run several weights against one input (`run_many`)."""
    if all(hasattr(layer, "kernel_state") for layer in layers):
        picks = [layer.kernel_state(x) for layer in layers]
        kernel = picks[0][0]
        if all(k is kernel for k, _ in picks) and hasattr(kernel, "run_many"):
            ys = kernel.run_many(x, layers, [state for _, state in picks])  # x (M, K) -> [(M, N_j)]
            if ys is not None:
                return [y + layer.bias.to(y.dtype) if layer.bias is not None else y for layer, y in zip(layers, ys)]
    return [layer(x) for layer in layers]


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


@dataclasses.dataclass
class FusedPlan:
    kernels: object  # the compiled ops module
    eps: list[tuple[float, float]]  # (input, post-attention) norm eps per layer
    final_eps: float


def fused_plan(model: nn.Module, spec, cache: KVCache) -> tuple[FusedPlan | None, str]:
    """A plan for the fused decode step, or (None, why not)."""
    dtype = cache.dtype
    if cache.quantized:
        return None, "the KV cache is quantized"
    if dtype not in (torch.float32, torch.bfloat16) or cache.k[0].device.type != "cpu":
        return None, f"the fused step runs float32/bfloat16 on CPU, not {dtype} on {cache.k[0].device}"
    kernels = ops()
    if kernels is None:
        return None, "the C++ decode ops are not available (no compiler, or SLIMLM_NO_CPP)"
    if spec.head_dim % 2:
        return None, "odd head dimension"
    base = model.model
    norms = [n for layer in base.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)] + [base.norm]
    if not all(_is_rms_norm(n, kernels, dtype) for n in norms):
        return None, "a norm is not Llama's RMSNorm"
    eps = [(_norm_eps(layer.input_layernorm), _norm_eps(layer.post_attention_layernorm)) for layer in base.layers]
    return FusedPlan(kernels, eps, _norm_eps(base.norm)), ""


def _qkv(spec, attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q (B, H·D), k, v (B, Hkv·D) of normed rows x (B, C), QK-norm applied (Qwen3)."""
    d, b = spec.head_dim, x.shape[0]
    if spec.fused_qkv:
        q, k, v = attn.qkv_proj(x).split([spec.n_heads * d, spec.n_kv_heads * d, spec.n_kv_heads * d], dim=-1)
    else:
        q, k, v = linear_many(x, [attn.q_proj, attn.k_proj, attn.v_proj])
    if spec.qk_norm:
        q, k = attn.q_norm(q.view(b, -1, d)).reshape(b, -1), attn.k_norm(k.view(b, -1, d)).reshape(b, -1)
    return q.contiguous(), k.contiguous(), v.contiguous()


@torch.no_grad()
def decode_step(model: nn.Module, spec, plan: FusedPlan, tokens: Tensor, positions: Tensor, cache: KVCache,
                rows: Tensor) -> Tensor:
    """Append tokens (B,) at positions (B,) of cache slots `rows` (B,); returns next-token logits (B, V)."""
    if int(positions.max()) >= cache.max_len:
        raise SlimError(f"sequence longer than the cache ({cache.max_len} tokens); raise max_len")
    ops_, base = plan.kernels, model.model
    h = base.embed_tokens(tokens).contiguous()  # (B, C); updated in place by the residual adds
    cos, sin = base.rotary_emb(h[:, None], positions[:, None])  # (B, 1, R)
    cos, sin = cos[:, 0].contiguous(), sin[:, 0].contiguous()  # (B, R)
    delta = None
    for i, layer in enumerate(base.layers):
        attn, mlp = layer.self_attn, layer.mlp
        eps_in, eps_post = plan.eps[i]
        x = ops_.add_rms_norm(h, delta, layer.input_layernorm.weight, eps_in)  # h += delta; x = norm(h)
        q, k, v = _qkv(spec, attn, x)
        out = ops_.rope_attend(q, k, v, cos, sin, cache.k[i], cache.v[i], rows, positions, spec.windows[i] or 0,
                               spec.scaling)  # (B, H·D)
        x = ops_.add_rms_norm(h, attn.o_proj(out), layer.post_attention_layernorm.weight, eps_post)
        if spec.fused_gate_up:
            gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = linear_many(x, [mlp.gate_proj, mlp.up_proj])
        delta = mlp.down_proj(ops_.silu_mul(gate, up))
    return model.lm_head(ops_.add_rms_norm(h, delta, base.norm.weight, plan.final_eps))  # (B, V)
