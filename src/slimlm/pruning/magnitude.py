"""Random and magnitude pruning.

random: each weight's score is uniform noise (as `torch.nn.utils.prune.random_unstructured`),
seeded; the baseline any method must beat. magnitude: the score is |w| (L1 unstructured pruning,
Han et al., "Learning both Weights and Connections for Efficient Neural Networks", arXiv 1506.02626),
compared across the whole layer by default (scope 'layer'), as in the baselines of Wanda and
SparseGPT.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimlm.pruning.config import PruneConfig
from slimlm.pruning.methods import PRUNERS, Pruner
from slimlm.pruning.unstructured import layer_weight, prune_by_scores_


def magnitude_scores(w: Tensor) -> Tensor:
    return w.abs().float()  # (N, K)


def random_scores(w: Tensor, generator: torch.Generator) -> Tensor:
    return torch.rand(w.shape, generator=generator)  # (N, K)


def magnitude_prune_(model: nn.Module, config: PruneConfig, samples=None, on_block=None) -> nn.Module:
    layers = config.targets(model)
    prune_by_scores_(layers, {n: magnitude_scores(layer_weight(m)) for n, m in layers.items()}, config, "layer")
    return model


def random_prune_(model: nn.Module, config: PruneConfig, samples=None, on_block=None) -> nn.Module:
    layers = config.targets(model)
    gen = torch.Generator().manual_seed(config.seed)
    prune_by_scores_(layers, {n: random_scores(layer_weight(m), gen) for n, m in layers.items()}, config, "layer")
    return model


PRUNERS.register("magnitude")(Pruner(PruneConfig, magnitude_prune_))
PRUNERS.register("random")(Pruner(PruneConfig, random_prune_))
