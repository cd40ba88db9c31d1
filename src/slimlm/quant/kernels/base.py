"""What a kernel is: the protocol every entry of the kernel table follows, and the defaults most
kernels share.

A kernel multiplies inputs by a compressed layer's weight. The layer stores its codes in a portable
layout (what goes to disk); `prepare` turns them once into whatever the kernel runs on (a repacked
copy, scales in the compute dtype), and the layer caches that state per device and dtype.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Kernel(Protocol):
    name: str

    def supports(self, layer, device: torch.device) -> bool:
        """Whether this kernel can run `layer` on `device` (scheme, shapes, CPU features, ops present)."""

    def prepare(self, layer, dtype: torch.dtype) -> Any:
        """The state `run` needs for inputs of `dtype` (repacked once; not part of the state dict)."""

    def run(self, x: Tensor, layer, state: Any) -> Tensor:
        """x (M, K) @ weightᵀ -> (M, N), without the bias."""

    def run_many(self, x: Tensor, layers: list, states: list) -> list[Tensor]:
        """[run(x, layer, state) ...] for several layers reading one input (q/k/v, gate/up), in one
        call where the kernel can (the engine groups such layers once, when it is built)."""

    def dense_weight(self, layer, state: Any) -> Tensor:
        """The weight (N, K) as this kernel computes with it (the dense path of prefill-sized inputs)."""


class KernelBase:
    """Defaults: `run_many` runs each layer in turn; `dense_weight` is the dequantized weight."""

    name = "kernel"

    def run_many(self, x: Tensor, layers: list, states: list) -> list[Tensor]:
        return [self.run(x, layer, state) for layer, state in zip(layers, states)]

    def dense_weight(self, layer, state: Any) -> Tensor:
        return layer.dequantize(torch.float32)
