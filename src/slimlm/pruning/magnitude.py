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

from slimlm.pruning.config import MagnitudeConfig, PruneConfig, RandomConfig
from slimlm.pruning.unstructured import prunable_weight, prune_by_scores_, unstructured_step


def magnitude_scores(w: Tensor) -> Tensor:
    return w.abs().float()  # (N, K)


def random_scores(w: Tensor, generator: torch.Generator) -> Tensor:
    return torch.rand(w.shape, generator=generator)  # (N, K)


def magnitude_prune_(model: nn.Module, layers: dict[str, nn.Module], config: PruneConfig, samples=None,
                     on_block=None) -> None:
    prune_by_scores_(layers, {n: magnitude_scores(prunable_weight(m)) for n, m in layers.items()}, config)


def random_prune_(model: nn.Module, layers: dict[str, nn.Module], config: PruneConfig, samples=None,
                  on_block=None) -> None:
    gen = torch.Generator().manual_seed(config.seed)
    prune_by_scores_(layers, {n: random_scores(prunable_weight(m), gen) for n, m in layers.items()}, config)


MAGNITUDE = unstructured_step(MagnitudeConfig, magnitude_prune_, False, "the smallest weights by |w|")
RANDOM = unstructured_step(RandomConfig, random_prune_, False, "random weights (the baseline)")
