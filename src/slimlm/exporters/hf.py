"""Dense Hugging Face folders: every compressed layer dequantized to a plain `nn.Linear` (pruned
weights are already exact zeros in memory), config.json without slimlm's blocks, so transformers,
vLLM and any other tool load the folder with no slimlm installed. For pruned models and for every
scheme compressed-tensors cannot express (int3/int2, log, fp8, W8A8, odd group widths)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from slimlm.core import format as F
from slimlm.core.errors import SlimError
from slimlm.core.layers import replace_module_


def densify_(model: nn.Module) -> nn.Module:
    """Replace every compressed layer of `model` by an `nn.Linear` holding its dequantized weight (in
    the layer's compute dtype), in place; return the model."""
    from slimlm.quant.linear import CompressedLinear

    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, CompressedLinear)]:
        dtype = getattr(layer, "compute_dtype", torch.float32)
        weight = layer.dequantize(dtype)
        bias = getattr(layer, "bias", None)
        dense = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=dtype)
        dense.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            dense.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        replace_module_(model, name, dense)
    for key in (F.QUANTIZATION, F.SPARSITY):
        if hasattr(model.config, key):
            delattr(model.config, key)
    return model


def export_hf(model: nn.Module, tokenizer, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `model` as a dense float Hugging Face folder at `out` (atomically). Dequantizes the
    model's compressed layers in place."""
    from slimlm.core.model_io import save_model

    if getattr(model.config, F.MODULE_SHAPES, None):
        raise SlimError("this model was pruned to different sizes per layer, which a Hugging Face config cannot "
                        "describe; prune with a uniform setting to export it")
    densify_(model)
    return save_model(model, out, tokenizer, overwrite=overwrite)
