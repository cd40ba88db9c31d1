"""Reference kernel: dequantize the whole weight, then a dense matmul. Always works; the oracle."""

from __future__ import annotations

import torch
from torch import Tensor


class ReferenceKernel:
    name = "reference"

    def supports(self, layer, device: torch.device) -> bool:
        return True

    def prepare(self, layer, dtype: torch.dtype) -> None:
        return None

    def run(self, x: Tensor, layer, state: None) -> Tensor:
        w = layer.dequantize(torch.float32)  # (N, K)
        return (x.float() @ w.t()).to(x.dtype)  # (M, N)


KERNEL = ReferenceKernel()
