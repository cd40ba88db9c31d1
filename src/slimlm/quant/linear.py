"""Compressed linear layers: `CompressedLinear`, what every such layer shares (a kernel from the
kernel table, chosen on first use and repacked once per device and dtype; `.to()` that keeps codes and
scales in their stored precision; size and spec for the saved format), and `QuantizedLinear`, whose
weight is stored as packed integer codes plus scales.

The buffers are the portable layout saved to disk: `qweight` (packed codes, see
`primitives.pack`), `scale` (N, G), `zero` (N, G) uint8 for asymmetric schemes, and `bias`. The
same layout holds every format of the scheme (int, log, fp8): the format only changes what a code
means, which `primitives.dequantize` knows and the saved scheme records.
Matmuls run through a kernel from the kernel registry, chosen on first use for the device and
repacked once (kernel state is not part of the state dict). `dequantize()` is the oracle every
kernel is tested against.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from slimlm.core.errors import SlimError
from slimlm.core.layers import in_features, out_features, weight_matrix
from slimlm.quant import primitives as P
from slimlm.quant.scheme import QuantScheme


def take(t: Tensor, dim: int, ranges: list[tuple[int, int]]) -> Tensor:
    """The index ranges [a, b) of `t` along `dim`, concatenated, as a compact tensor of its own (kernels
    read contiguous codes and scales)."""
    parts = [t.narrow(dim, a, b - a) for a, b in ranges]
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim)


def check_finite_weight(name: str, weight: Tensor) -> None:
    """Refuse to quantize NaN/inf weights: they would poison every scale of their group."""
    if not torch.isfinite(weight).all():
        raise SlimError(f"layer '{name}' has NaN or infinite weights; the checkpoint is corrupt, restore it")


class CompressedLinear(nn.Module):
    """Base of compressed linear layers. Subclasses set `slimlm_kind` (how config.json names the kind),
    `scheme` (with `label()` and `to_dict()`), `in_features`, `out_features`, `compute_dtype`, the
    buffers `qweight`, `scale` and `bias`, and define `dequantize(dtype)` and `reference_matmul(x)`
    (the exact float32 oracle the `reference` kernel runs)."""

    slimlm_kind: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        self.kernel_name: str | None = None  # None: pick the fastest kernel that supports the layer
        self._kernel_cache: tuple[Any, ...] | None = None  # (key, kernel, state)

    def set_kernel_(self, name: str | None) -> "CompressedLinear":
        """Force a kernel by its name in the kernel table (None: automatic); checked on the next forward."""
        from slimlm.quant.kernels import KERNELS

        if name is not None:
            KERNELS.get(name)  # an unknown name fails now, with the valid ones
        self.kernel_name, self._kernel_cache = name, None
        return self

    def kernel_state(self, x: Tensor) -> tuple[Any, Any]:
        """(kernel, its prepared state) for inputs like x: chosen and repacked on first use."""
        from slimlm.quant.kernels import choose_kernel

        key = (x.device, x.dtype, self.kernel_name)
        if self._kernel_cache is None or self._kernel_cache[0] != key:
            kernel = choose_kernel(self, x.device, self.kernel_name)
            self._kernel_cache = (key, kernel, kernel.prepare(self, x.dtype))
        return self._kernel_cache[1], self._kernel_cache[2]

    @property
    def kernel(self) -> str | None:
        """Name of the kernel in use (None until the first forward)."""
        return self._kernel_cache[1].name if self._kernel_cache else None

    def _apply(self, fn, recurse=True):
        """`.to()`, `.cuda()`, `.half()`: codes and scales keep their stored precision and follow the
        device only; the bias and the compute dtype follow float casts; kernel state is rebuilt."""
        self._kernel_cache = None
        scale = self.scale
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype, device=scale.device)).dtype
        super()._apply(fn, recurse)
        self.scale = scale.to(self.scale.device)
        return self

    def forward(self, x: Tensor) -> Tensor:
        kernel, state = self.kernel_state(x)
        y = kernel.run(x.reshape(-1, self.in_features), self, state)  # (M, N)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def slimlm_spec(self) -> dict[str, Any]:
        return {"scheme": self.scheme.to_dict()}

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, getattr(self, "zero", None),
                                                           self.bias) if t is not None)

    # --- tensor parallelism: shards in the portable layout, so parallel code never reads the codes ---

    def shard_slices(self, dim: int, ranges: list[tuple[int, int]], name: str = "layer") -> dict[str, tuple]:
        """What a shard keeping outputs (dim 0) or inputs (dim 1) `ranges` keeps of each stored tensor:
        name -> (tensor dim, index ranges) (the bias is handled by `empty_shard`'s keep_bias). A split that
        would cut a quantization group or a packed byte raises a SlimError naming the layer and the sizes."""
        raise SlimError(f"{name}: {type(self).__name__} cannot be split for tensor parallelism")

    def empty_shard(self, dim: int, ranges: list[tuple[int, int]], keep_bias: bool) -> "CompressedLinear":
        """A layer of this kind on the meta device with the shard's shapes, to be filled (`fill_`)."""
        raise NotImplementedError

    def shard(self, dim: int, ranges: list[tuple[int, int]], keep_bias: bool = True,
              name: str = "layer") -> "CompressedLinear":
        """The shard keeping outputs (dim 0, column-parallel) or inputs (dim 1, row-parallel) `ranges`, as a
        new layer of the same kind and scheme; keep_bias False drops a row shard's bias (added once, after
        the partial outputs are summed)."""
        tensors = {key: take(getattr(self, key), d, rs) for key, (d, rs) in self.shard_slices(dim, ranges, name).items()}
        if self.bias is not None and (dim == 0 or keep_bias):
            tensors["bias"] = take(self.bias, 0, ranges) if dim == 0 else self.bias
        shard = self.empty_shard(dim, ranges, keep_bias).fill_(tensors)
        shard.kernel_name = self.kernel_name  # a forced kernel stays forced
        return shard

    def fill_(self, tensors: dict[str, Tensor]) -> "CompressedLinear":
        """Put the stored tensors in place (assign, no copies); returns the layer."""
        for key, value in tensors.items():
            if getattr(self, key, None) is None:
                raise SlimError(f"a shard of {type(self).__name__} has no tensor '{key}'")
            setattr(self, key, value)
        self._kernel_cache = None
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme.label()}"


class QuantizedLinear(CompressedLinear):
    slimlm_kind = "quantized_linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: QuantScheme,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        kp = P.padded_k(in_features, scheme)
        groups = kp // P.group_size_for(in_features, scheme)
        packed_cols = kp if scheme.bits == 8 else -(-kp // 8) * scheme.bits
        packed_dtype = torch.int8 if scheme.bits == 8 else torch.uint8
        self.register_buffer("qweight", torch.empty(out_features, packed_cols, dtype=packed_dtype, device=device))
        self.register_buffer("scale", torch.empty(out_features, groups, dtype=scheme.torch_scale_dtype, device=device))
        if not scheme.symmetric:
            self.register_buffer("zero", torch.empty(out_features, groups, dtype=torch.uint8, device=device))
        else:
            self.zero = None
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self.compute_dtype = dtype  # activations' dtype the layer was built for

    @classmethod
    def from_float(cls, module: nn.Module, scheme: QuantScheme) -> "QuantizedLinear":
        """Quantize an nn.Linear (or GPT-2 Conv1D) with round-to-nearest."""
        weight = weight_matrix(module)
        scale, zero = P.compute_qparams(weight, scheme)
        return cls.from_codes(P.quantize(weight, scale, zero, scheme), scale, zero, module, scheme)

    @classmethod
    def from_codes(
        cls, codes: Tensor, scale: Tensor, zero: Tensor, module: nn.Module, scheme: QuantScheme
    ) -> "QuantizedLinear":
        """Build from codes (N, K_padded) and qparams (N, G), taking shape and bias from `module`."""
        weight = module.weight
        bias = getattr(module, "bias", None)
        layer = cls(in_features(module), codes.shape[0], scheme, bias=bias is not None, dtype=weight.dtype,
                    device=weight.device)
        layer.qweight.copy_(P.pack(codes, scheme.bits))
        layer.scale.copy_(scale)
        if layer.zero is not None:
            layer.zero.copy_(zero.to(torch.uint8))
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def codes(self) -> Tensor:
        """Unpacked codes (N, K_padded) uint8."""
        return P.unpack(self.qweight, self.scheme.bits, P.padded_k(self.in_features, self.scheme))

    def zero_points(self) -> Tensor:
        """Integer zero points (N, G) int32 (the fixed midpoint for symmetric schemes)."""
        if self.zero is not None:
            return self.zero.to(torch.int32)
        return torch.full(self.scale.shape, 2 ** (self.scheme.bits - 1), dtype=torch.int32, device=self.scale.device)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight (N, K) this layer represents: the oracle for every kernel."""
        return P.dequantize(self.codes(), self.scale, self.zero_points(), self.in_features, dtype or self.compute_dtype,
                            self.scheme)

    def reference_matmul(self, x: Tensor) -> Tensor:
        """x (M, K) @ the dequantized weight, in float32: what this layer means."""
        return (x.float() @ self.dequantize(torch.float32).t()).to(x.dtype)  # (M, N)

    def shard_slices(self, dim: int, ranges: list[tuple[int, int]], name: str = "layer") -> dict[str, tuple]:
        stored = ["qweight", "scale"] + (["zero"] if self.zero is not None else [])
        if dim == 0:
            return {key: (0, ranges) for key in stored}
        k, bits = self.in_features, self.scheme.bits
        g = P.group_size_for(k, self.scheme)
        if P.padded_k(k, self.scheme) != k:
            raise SlimError(f"{name}: its {k} inputs are padded to whole groups of {g}; it cannot be split along its "
                            "inputs (quantize with a group size that divides it)")
        per_channel = g == k
        for a, b in ranges:
            if (not per_channel and (a % g or b % g)) or a % 8 or b % 8:
                unit = 8 if per_channel else g
                raise SlimError(f"{name}: splitting its {k} inputs at {a}..{b} would cut a quantization group of {unit}; "
                                f"use a tensor-parallel size that divides {k // unit} groups evenly")
        slices = {"qweight": (1, [(a * bits // 8, b * bits // 8) for a, b in ranges])}
        for key in stored[1:]:
            slices[key] = (1, [(0, 1)] if per_channel else [(a // g, b // g) for a, b in ranges])
        return slices

    def empty_shard(self, dim: int, ranges: list[tuple[int, int]], keep_bias: bool) -> "QuantizedLinear":
        size = sum(b - a for a, b in ranges)
        n, k = (size, self.in_features) if dim == 0 else (self.out_features, size)
        bias = self.bias is not None and (dim == 0 or keep_bias)
        return QuantizedLinear(k, n, self.scheme, bias=bias, dtype=self.compute_dtype, device="meta")


def quantized_skeleton(group: dict[str, Any], original: nn.Module) -> QuantizedLinear:
    """An empty QuantizedLinear on the meta device shaped like `original` (Linear or Conv1D): what the
    loader builds for a saved layer of kind "quantized_linear" before assigning its tensors."""
    scheme = QuantScheme.from_dict(group["scheme"])
    return QuantizedLinear(in_features(original), out_features(original), scheme,
                           bias=getattr(original, "bias", None) is not None, dtype=original.weight.dtype, device="meta")

