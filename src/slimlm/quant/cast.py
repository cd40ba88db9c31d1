"""Casting to a 16-bit float type (fp16/bf16): the simplest weight compression, 2x smaller than fp32."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from slimlm.core.config import Config, check, field
from slimlm.core.layers import FLOAT_DTYPES, is_compressed
from slimlm.core.steps import Step


@dataclasses.dataclass(frozen=True)
class CastConfig(Config):
    name = "cast"
    dtype: str = field("bfloat16", "float dtype of the weights: float32, bfloat16 or float16")

    def __post_init__(self) -> None:
        check(self.dtype in FLOAT_DTYPES, f"dtype '{self.dtype}' is not supported; use one of {', '.join(FLOAT_DTYPES)}")

    def describe(self) -> str:
        return self.dtype


def cast_(model: nn.Module, config: CastConfig, samples=None, on_block=None) -> nn.Module:
    """Cast the model's floating-point weights in place; returns the model.

    Unlike `model.to(dtype)`, non-persistent buffers (RoPE frequency tables) stay in float32, as
    transformers keeps them when it loads a 16-bit checkpoint, so a cast model and the same model
    saved and reloaded compute identically. Quantized layers keep their codes and scales.
    """
    dtype = FLOAT_DTYPES[config.dtype]
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in module.named_buffers(recurse=False):
            keep = name in module._non_persistent_buffers_set or (is_compressed(module) and name == "scale")
            if b.is_floating_point() and not keep:
                setattr(module, name, b.to(dtype))
        if is_compressed(module):  # a compressed layer: codes and scales keep their precision
            module.compute_dtype = dtype
            module.set_kernel_(module.kernel_name)
    if hasattr(model, "config"):
        model.config.dtype = dtype
    return model


CAST = Step(CastConfig, cast_, "quantize", summary="cast the weights to float16/bfloat16")
