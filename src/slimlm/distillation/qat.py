"""Quantization-aware training (QAT) from post-training-quantized weights.

`prepare_qat_` turns each QuantizedLinear back into a float layer holding its dequantized weight,
whose forward uses the fake-quantized weight ŵ = w + (Q(w) − w).detach(): the forward pass sees the
quantized grid, the backward pass lets gradients through as if Q were the identity (the
straight-through estimator, Bengio et al., arXiv 1308.3432; as in Jacob et al., arXiv 1712.05877).
Q is round-to-nearest with the layer's own scheme, its scales and zero points recomputed from the
current weight at each step. `convert_qat_` quantizes the trained weights with the same scheme back
into QuantizedLinear layers (the real format, whose kernels run them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimlm.core.layers import replace_module_
from slimlm.quant.linear import QuantizedLinear
from slimlm.quant.primitives import fake_quantize
from slimlm.quant.scheme import QuantScheme


class FakeQuantLinear(nn.Linear):
    """A float linear layer trained through its quantized grid (straight-through estimator)."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, bias: bool = True,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_features, out_features, bias=bias, dtype=dtype)
        self.scheme = scheme

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        w_q = w + (fake_quantize(w.detach(), self.scheme) - w).detach()
        return F.linear(x, w_q, self.bias)


def prepare_qat_(model: nn.Module) -> nn.Module:
    """Replace every QuantizedLinear with a FakeQuantLinear starting from its dequantized weight."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            dtype = module.compute_dtype
            layer = FakeQuantLinear(module.in_features, module.out_features, module.scheme,
                                    bias=module.bias is not None, dtype=dtype)
            with torch.no_grad():
                layer.weight.copy_(module.dequantize(torch.float32).to(dtype))
                if module.bias is not None:
                    layer.bias.copy_(module.bias)
            replace_module_(model, name, layer.to(module.scale.device))
    return model


@torch.no_grad()
def convert_qat_(model: nn.Module) -> nn.Module:
    """Quantize every FakeQuantLinear's trained weight into a QuantizedLinear (same scheme)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantLinear):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              dtype=module.weight.dtype, device=module.weight.device)
            plain.weight.copy_(module.weight)
            if module.bias is not None:
                plain.bias.copy_(module.bias)
            replace_module_(model, name, QuantizedLinear.from_float(plain, module.scheme))
    return model
