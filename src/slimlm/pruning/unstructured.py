"""Shared wiring of the score-based methods: scores per layer -> masks (by row, layer, globally or
n:m) -> weights zeroed in place, and the sparsity record saved with the model."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimlm.core.config import check
from slimlm.core.targeting import is_conv1d
from slimlm.pruning import masks as M
from slimlm.pruning.config import PruneConfig


def layer_weight(module: nn.Module) -> Tensor:
    """The (N, K) weight of a Linear or Conv1D (a view: writes reach the module)."""
    check(hasattr(module, "weight") and not hasattr(module, "scheme"),
          "pruning works on float layers; prune first, then quantize (the zeros are kept)")
    return module.weight.data.t() if is_conv1d(module) else module.weight.data


def mask_for(scores: Tensor, config: PruneConfig, default_scope: str) -> Tensor:
    """Mask (N, K) of one layer from its scores: n:m if a pattern is set, else top-k by scope."""
    if config.nm:
        return M.nm_mask(scores, *config.nm)
    scope = config.scope or default_scope
    check(scope != "global", "global scope needs every layer's scores at once; use prune_by_scores_")
    return M.topk_mask(scores, config.sparsity, per_row=scope == "row")


@torch.no_grad()
def prune_by_scores_(layers: dict[str, nn.Module], scores: dict[str, Tensor], config: PruneConfig,
                     default_scope: str) -> None:
    """Zero the lowest-scoring weights of each layer (scores (N, K) per layer name), in place."""
    if not config.nm and (config.scope or default_scope) == "global":
        masks = M.global_masks(scores, config.sparsity)
    else:
        masks = {name: mask_for(s, config, default_scope) for name, s in scores.items()}
    for name, layer in layers.items():
        M.apply_mask_(layer_weight(layer), masks[name])


def sparsity_record(model: nn.Module, method: str, config: PruneConfig, layers: dict[str, nn.Module]) -> dict:
    """What config.json's `sparsity_config` block says: the method, the pattern and the pruned layers."""
    return {"method": method, "sparsity": config.target_sparsity, "pattern": config.pattern,
            "targets": sorted(layers),
            "measured": {name: round(M.sparsity(layer_weight(layer)), 6) for name, layer in layers.items()}}
