"""What every package asks of a layer and of a model, answered once.

- Linear layers come in two storage orders: `nn.Linear` keeps its weight (out, in), GPT-2's `Conv1D`
  keeps it (in, out). `weight_matrix` always gives (out, in), as a view whose writes reach the layer.
- A *compressed* layer (slimlm's QuantizedLinear, W8A8Linear, ...) is a module class with a
  `slimlm_kind` string (how config.json names it): it stores codes instead of a float weight, knows
  its `in_features`/`out_features`, its `scheme`, `storage_bytes()`, `dequantize()`, and runs through
  a kernel (`kernel_state(x) -> (kernel, state)`; see `slimlm.quant.kernels`).
- The transformer blocks of a model: a short table of known paths, else the largest list of
  identical modules. Block surgery (`keep_blocks_`) renumbers them and fixes the config.
- The context length a model was trained for, and its floating-point dtype.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from slimlm.core.errors import SlimError

BLOCK_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "transformer.blocks")
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


@runtime_checkable
class CompressedLayer(Protocol):
    """The part of a compressed linear layer that packages other than `quant` rely on."""

    slimlm_kind: str
    in_features: int
    out_features: int
    bias: Tensor | None

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor: ...

    def storage_bytes(self) -> int: ...

    def kernel_state(self, x: Tensor) -> tuple[Any, Any]: ...


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style `Conv1D`: a linear layer whose weight is stored (in_features, out_features)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_compressed(module: nn.Module) -> bool:
    """A compressed linear layer (its class names its on-disk kind in `slimlm_kind`)."""
    return isinstance(getattr(type(module), "slimlm_kind", None), str)


def is_linear(module: nn.Module) -> bool:
    """A dense float linear layer: nn.Linear or GPT-2's Conv1D (not a compressed one)."""
    return (isinstance(module, nn.Linear) or is_conv1d(module)) and not is_compressed(module)


def weight_matrix(module: nn.Module) -> Tensor:
    """The (out, in) weight of a Linear or Conv1D, detached; a view, so in-place writes reach the layer."""
    w = module.weight.data
    return w.t() if is_conv1d(module) else w


def in_features(module: nn.Module) -> int:
    if is_compressed(module) or not hasattr(module, "weight"):
        return module.in_features
    return module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1]


def out_features(module: nn.Module) -> int:
    if is_compressed(module) or not hasattr(module, "weight"):
        return module.out_features
    return module.weight.shape[1] if is_conv1d(module) else module.weight.shape[0]


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """All dense linear layers (nn.Linear and GPT-2 Conv1D) by name, in module order."""
    return {name: m for name, m in model.named_modules() if name and is_linear(m)}


def output_head_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


def replace_module_(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` was (in place)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (what config.json records)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def model_device(model: nn.Module) -> torch.device:
    """The device the model's materialised tensors are on (a pipeline stage keeps the layers it does not
    hold on the meta device, so the first parameter is not enough)."""
    for t in (*model.parameters(), *model.buffers()):
        if not t.is_meta:
            return t.device
    return torch.device("cpu")


def context_length(model_or_config: Any) -> int | None:
    """The number of positions the model was built for (None when its config does not say)."""
    config = getattr(model_or_config, "config", model_or_config)
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def block_output(output: Any) -> Tensor:
    """The hidden states a transformer block returns (some return a tuple with attention weights)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: a known path, else the largest ModuleList of same-class modules."""
    for path in BLOCK_PATHS:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return path, blocks
    candidates = [
        (sum(p.numel() for p in m.parameters()), name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1
    ]
    if not candidates:
        raise SlimError(f"cannot find the transformer blocks of {type(model).__name__}; it has no list of layers")
    _, name, blocks = max(candidates, key=lambda c: c[0])
    return name, blocks


def keep_blocks_(model: nn.Module, kept: list[int]) -> nn.Module:
    """Keep only the transformer blocks `kept` (in that order), renumbered, with the config to match."""
    path, blocks = find_blocks(model)
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.ModuleList([blocks[i] for i in kept]))
    for new_index, block in enumerate(getattr(parent, child)):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index  # the KV cache is indexed by it
    c = model.config
    c.num_hidden_layers = len(kept)
    if getattr(c, "layer_types", None):
        c.layer_types = [c.layer_types[i] for i in kept]
    return model
