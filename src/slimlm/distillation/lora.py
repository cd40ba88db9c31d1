"""Low-rank adapters (LoRA, Hu et al., arXiv 2106.09685) on a frozen, possibly quantized model (as
QLoRA, Dettmers et al., arXiv 2305.14314, does on 4-bit weights): y = base(x) + (α/r)·x Aᵀ Bᵀ with
A (r, K) Kaiming-initialised and B (N, r) zero, so training starts from the base model exactly.

`merge_lora_` folds the adapters back: into float weights exactly (W + (α/r)·B A); into quantized
layers by re-quantizing the merged weight with the layer's own scheme (round-to-nearest), which
moves some codes: merging into a quantized model is lossy, and the loss is measured in the tests.
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase

import torch
from torch import Tensor, nn

from slimlm.core.config import check
from slimlm.core.layers import is_compressed, is_conv1d, is_linear, replace_module_


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        self.base, self.rank, self.scaling = base, rank, alpha / rank
        k, n = base.in_features, base.out_features
        w = getattr(base, "weight", None)
        dtype = w.dtype if w is not None and w.is_floating_point() else getattr(base, "compute_dtype", torch.float32)
        device = next(base.buffers(), next(base.parameters(), torch.empty(0))).device
        self.lora_a = nn.Parameter(torch.empty(rank, k, dtype=dtype, device=device))
        self.lora_b = nn.Parameter(torch.zeros(n, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scaling

    def delta(self) -> Tensor:
        """(α/r)·B A (N, K) in float32."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scaling


def add_lora_(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets: tuple[str, ...] = ("*",)) -> nn.Module:
    """Wrap the linear layers (float or quantized) matching `targets` (globs; the output head only when
    named) with adapters and freeze everything else."""
    check(isinstance(rank, int) and rank >= 1, f"LoRA rank {rank!r} must be a positive integer")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    chosen = [name for name, m in model.named_modules()
              if name and (is_linear(m) or is_compressed(m)) and m is not head
              and any(fnmatchcase(name, g) for g in targets)]
    check(chosen, f"no linear layer matches {list(targets)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        check(not is_conv1d(model.get_submodule(name)), "LoRA on GPT-2 Conv1D layers is not supported")
        replace_module_(model, name, LoRALinear(model.get_submodule(name), rank, alpha))
    return model


@torch.no_grad()
def merge_lora_(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer and drop the wrapper (quantized bases are re-quantized)."""
    for name, m in list(model.named_modules()):
        if not isinstance(m, LoRALinear):
            continue
        base = m.base
        if is_compressed(base):  # dequantize, add, re-quantize with the same scheme
            dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=base.scale.device)
            dense.weight.copy_(base.dequantize(torch.float32) + m.delta())
            if base.bias is not None:
                dense.bias.copy_(base.bias.float())
            merged = type(base).from_float(dense, base.scheme).to(base.compute_dtype)
        else:
            base.weight.add_(m.delta().to(base.weight.dtype))
            merged = base
        replace_module_(model, name, merged)
    for p in model.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    return model
