"""Casting to a 16-bit float type (fp16/bf16): the simplest weight compression, 2x smaller than fp32."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from slimlm.core.config import Config, check
from slimlm.quant.methods import METHODS, Method

FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class CastConfig(Config):
    name = "cast"
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        check(self.dtype in FLOAT_DTYPES, f"dtype '{self.dtype}' is not supported; use one of {', '.join(FLOAT_DTYPES)}")


def cast_(model: nn.Module, config: CastConfig) -> nn.Module:
    """Cast the model's floating-point weights in place (quantized layers keep their codes)."""
    return model.to(FLOAT_DTYPES[config.dtype])


METHODS.register("cast")(Method(CastConfig, cast_))
