"""Reference kernel: the layer's own definition of what it computes (`reference_matmul`: for a
QuantizedLinear the dequantized weight in a float32 matmul). Runs every compressed layer; the oracle."""

from __future__ import annotations

import torch
from torch import Tensor

from slimlm.quant.kernels.base import KernelBase


class ReferenceKernel(KernelBase):
    name = "reference"

    def supports(self, layer, device: torch.device) -> bool:
        return True

    def prepare(self, layer, dtype: torch.dtype) -> None:
        return None

    def run(self, x: Tensor, layer, state: None) -> Tensor:
        return layer.reference_matmul(x)  # (M, N)


REFERENCE = ReferenceKernel()
