"""W8A8Linear: int8 weights (symmetric, per output channel) and int8 activations (symmetric,
dynamic, per token), multiplied on an int8 x int8 -> int32 matmul (SmoothQuant, arXiv 2211.10438,
the "O3"-style dynamic per-token variant; weights as in LLM.int8(), arXiv 2208.07339).

    y = (q_x · q_Wᵀ) ⊙ (s_x s_Wᵀ) + b,  q_x = round(x / s_x), s_x = max|x_t| / 127 per token t

It runs through the shared kernel table: `w8a8_int_mm` (`torch._int_mm`, see kernels/w8a8.py) where
it can, else `reference` (`reference_matmul`: both operands dequantized, multiplied in float32).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from slimlm.core.config import Config, check
from slimlm.core.layers import in_features, out_features, weight_matrix
from slimlm.quant.kernels.w8a8 import quantize_rows
from slimlm.quant.linear import CompressedLinear


@dataclasses.dataclass(frozen=True)
class W8A8Scheme(Config):
    """The only W8A8 layout so far: int8 per-channel weights, int8 dynamic per-token activations."""

    name = "w8a8 scheme"
    weights: str = "int8 per-channel"
    activations: str = "int8 per-token dynamic"

    def __post_init__(self) -> None:
        check(self.weights == "int8 per-channel" and self.activations == "int8 per-token dynamic",
              "only int8 per-channel weights with int8 per-token dynamic activations are supported")

    def label(self) -> str:
        return "w8a8 int8 per-token"


class W8A8Linear(CompressedLinear):
    slimlm_kind = "w8a8_linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, W8A8Scheme()
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.compute_dtype = dtype

    @classmethod
    def from_float(cls, module: nn.Module) -> "W8A8Linear":
        """Quantize an nn.Linear (or GPT-2 Conv1D) weight per output channel."""
        w = weight_matrix(module)  # (N, K)
        bias = getattr(module, "bias", None)
        layer = cls(w.shape[1], w.shape[0], bias is not None, w.dtype, w.device)
        codes, scale = quantize_rows(w)
        layer.qweight.copy_(codes)
        layer.scale.copy_(scale[:, 0])
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.qweight.float() * self.scale[:, None]).to(dtype)  # (N, K)

    def shard_slices(self, dim: int, ranges: list[tuple[int, int]], name: str = "layer") -> dict[str, tuple]:
        if dim != 0:
            from slimlm.core.errors import SlimError

            raise SlimError(f"{name}: a W8A8 layer quantizes each token's activations over all its inputs, so it "
                            "cannot be split along them; use a weight-only scheme for tensor parallelism")
        return {"qweight": (0, ranges), "scale": (0, ranges)}

    def empty_shard(self, dim: int, ranges: list[tuple[int, int]], keep_bias: bool) -> "W8A8Linear":
        return W8A8Linear(self.in_features, sum(b - a for a, b in ranges), bias=self.bias is not None,
                          dtype=self.compute_dtype, device="meta")

    def reference_matmul(self, x: Tensor) -> Tensor:
        """x (M, K) quantized per row, times the dequantized weight, in float32: what this layer means."""
        q, sx = quantize_rows(x)
        return ((q.float() * sx) @ self.dequantize(torch.float32).t()).to(x.dtype)  # (M, N)


def w8a8_skeleton(group: dict[str, Any], original: nn.Module) -> W8A8Linear:
    """An empty W8A8Linear on the meta device shaped like `original` (what the loader fills)."""
    W8A8Scheme.from_dict(group["scheme"])
    return W8A8Linear(in_features(original), out_features(original), bias=getattr(original, "bias", None) is not None,
                      dtype=original.weight.dtype, device="meta")
