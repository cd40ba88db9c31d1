"""Shared wiring of the unstructured and n:m methods: scores per layer -> masks (by row, layer,
globally or n:m) -> weights zeroed in place, and the record of what was pruned that a saved model
carries in config.json (`slimlm_sparsity`)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from slimlm.core import format as F
from slimlm.core.config import check
from slimlm.core.layers import is_compressed, weight_matrix
from slimlm.core.steps import Step
from slimlm.pruning import masks as M
from slimlm.pruning.config import PruneConfig


def prunable_weight(module: nn.Module) -> Tensor:
    """The (N, K) weight of a float Linear or Conv1D (a view: writes reach the module)."""
    check(hasattr(module, "weight") and not is_compressed(module),
          "pruning works on float layers; prune first, then quantize (the zeros are kept)")
    return weight_matrix(module)


def mask_for(scores: Tensor, config: PruneConfig) -> Tensor:
    """Mask (N, K) of one layer from its scores: n:m if a pattern is set, else top-k by scope."""
    if config.nm:
        return M.nm_mask(scores, *config.nm)
    scope = config.scope or config.default_scope
    check(scope != "global", "global scope needs every layer's scores at once; use prune_by_scores_")
    return M.topk_mask(scores, config.sparsity, per_row=scope == "row")


@torch.no_grad()
def prune_by_scores_(layers: dict[str, nn.Module], scores: dict[str, Tensor], config: PruneConfig) -> None:
    """Zero the lowest-scoring weights of each layer (scores (N, K) per layer name), in place."""
    if not config.nm and (config.scope or config.default_scope) == "global":
        masks = M.global_masks(scores, config.sparsity)
    else:
        masks = {name: mask_for(s, config) for name, s in scores.items()}
    for name, layer in layers.items():
        M.apply_mask_(prunable_weight(layer), masks[name])


def sparsity_record(config: PruneConfig, layers: dict[str, nn.Module]) -> dict:
    """config.json's `slimlm_sparsity` block: the method, the pattern, the pruned layers and their measured sparsity."""
    return {"version": F.SPARSITY_VERSION, "method": config.name, "sparsity": config.target_sparsity,
            "pattern": config.pattern, "targets": sorted(layers),
            "measured": {name: round(M.sparsity(prunable_weight(layer)), 6) for name, layer in layers.items()}}


Prune = Callable[[nn.Module, dict[str, nn.Module], PruneConfig, "Tensor | None", "Callable | None"], None]


def unstructured_step(config_cls: type[PruneConfig], prune: Prune, calibrated: bool, summary: str) -> Step:
    """A step that prunes `config.targets(model)` with `prune(model, layers, config, samples, on_block)`
    and records what it did on model.config (saved to config.json)."""

    def apply(model: nn.Module, config: PruneConfig, samples: Tensor | None = None, on_block=None) -> nn.Module:
        layers = config.targets(model)
        prune(model, layers, config, samples, on_block)
        setattr(model.config, F.SPARSITY, sparsity_record(config, layers))
        return model

    return Step(config_cls, apply, "prune", calibrated=calibrated, summary=summary)
