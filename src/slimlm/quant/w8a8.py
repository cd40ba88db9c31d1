"""W8A8Linear: int8 weights (symmetric, per output channel) and int8 activations (symmetric,
dynamic, per token), multiplied on an int8 x int8 -> int32 matmul (SmoothQuant, arXiv 2211.10438,
the "O3"-style dynamic per-token variant; weights as in LLM.int8(), arXiv 2208.07339).

    y = (q_x · q_Wᵀ) ⊙ (s_x s_Wᵀ) + b,  q_x = round(x / s_x), s_x = max|x_t| / 127 per token t

Kernels: `reference` dequantizes both operands and multiplies in float32 (the oracle); `int_mm`
runs `torch._int_mm` with exact int32 accumulation (on CPU 3.8x faster than a float32 matmul at one
row and 7x at 512 rows for a 2048x2048 layer, benchmarks/kernels.py). CUDA's `_int_mm` needs more
than 16 rows and dimensions divisible by 8: fewer rows are padded, other shapes use the reference.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from slimlm.core.config import Config, check
from slimlm.core.model_io import COMPRESSED_MODULES
from slimlm.core.targeting import is_conv1d

KERNEL_NAMES = ("int_mm", "reference")


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


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 codes (M, K) and float32 scales (M, 1) of each row of x (M, K)."""
    scale = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127  # (M, 1)
    return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8), scale


class W8A8Linear(nn.Module):
    slimlm_kind = "w8a8_linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, W8A8Scheme()
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.compute_dtype = dtype
        self.kernel_name: str | None = None  # None: int_mm where it runs, else reference

    @classmethod
    def from_float(cls, module: nn.Module) -> "W8A8Linear":
        """Quantize an nn.Linear (or GPT-2 Conv1D) weight per output channel."""
        w = module.weight.detach()
        w = w.t() if is_conv1d(module) else w  # (N, K)
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

    def set_kernel_(self, name: str | None) -> "W8A8Linear":
        check(name is None or name in KERNEL_NAMES, f"unknown W8A8 kernel '{name}'; valid: {', '.join(KERNEL_NAMES)}")
        self.kernel_name = name
        return self

    def _choose(self, x: Tensor) -> str:
        if self.kernel_name:
            return self.kernel_name
        if x.device.type == "cpu" or (x.device.type == "cuda" and self.in_features % 8 == 0 and self.out_features % 8 == 0):
            return "int_mm"
        return "reference"

    def _apply(self, fn, recurse=True):
        """Codes and scales keep their precision (only the device follows); the bias and compute dtype follow casts."""
        scale = self.scale
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype, device=scale.device)).dtype
        super()._apply(fn, recurse)
        self.scale = scale.to(self.scale.device)
        return self

    @property
    def kernel(self) -> str:
        return self.kernel_name or "auto"

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        q, sx = quantize_rows(x2)  # (M, K) int8, (M, 1)
        kernel = self._choose(x2)
        if kernel == "int_mm":
            m = q.shape[0]
            if q.device.type == "cuda" and m <= 16:
                q = torch.nn.functional.pad(q, (0, 0, 0, 17 - m))  # CUDA's int8 GEMM needs more than 16 rows
            y = torch._int_mm(q, self.qweight.t())[:m].float() * sx * self.scale  # (M, N)
        else:
            y = (q.float() * sx) @ self.dequantize().t()
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def slimlm_spec(self) -> dict[str, Any]:
        return {"scheme": self.scheme.to_dict()}

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.bias) if t is not None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme.label()}"


@COMPRESSED_MODULES.register(W8A8Linear.slimlm_kind)
def _skeleton(group: dict[str, Any], original: nn.Module) -> W8A8Linear:
    W8A8Scheme.from_dict(group["scheme"])
    w = original.weight
    k, n = (w.shape[0], w.shape[1]) if is_conv1d(original) else (w.shape[1], w.shape[0])
    return W8A8Linear(k, n, bias=getattr(original, "bias", None) is not None, dtype=w.dtype, device="meta")
