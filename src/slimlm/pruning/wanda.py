"""Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models",
arXiv 2306.11695): score S_ij = |W_ij| · ‖X_j‖₂, the weight magnitude times the L2 norm of its
input feature over the calibration tokens, compared within each output row (or each n:m group);
no weight update. Runs block by block on the shared calibration driver, so each block sees the
inputs of the already-pruned blocks before it, as in the paper's code.

Invariant (tested): with equal input norms the mask is per-row magnitude pruning.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimlm.core.calibrate import run_blockwise
from slimlm.core.distributed import sum_
from slimlm.pruning import masks as M
from slimlm.pruning.config import PruneConfig, WandaConfig
from slimlm.pruning.unstructured import mask_for, prunable_weight, unstructured_step


def wanda_scores(w: Tensor, input_sq_norm: Tensor) -> Tensor:
    """|W| (N, K) times ‖X_j‖₂ from the summed squares of each input column (K,)."""
    return w.abs().float() * input_sq_norm.sqrt()[None, :]


class WandaStep:
    def __init__(self, config: PruneConfig) -> None:
        self.config = config
        self.norms: dict[str, Tensor] = {}

    def observe(self, name: str, module: nn.Module, inputs: Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).float()  # (M, K)
        self.norms[name] = self.norms.get(name, torch.zeros(x.shape[1], device=x.device)) + (x * x).sum(0)

    @torch.no_grad()
    def compress(self, name: str, module: nn.Module) -> None:
        w = prunable_weight(module)
        norms = sum_(self.norms.pop(name))  # over every process's calibration rows
        M.apply_mask_(w, mask_for(wanda_scores(w, norms.to(w.device)), self.config))
        return None


def wanda_prune_(model: nn.Module, layers: dict[str, nn.Module], config: PruneConfig, samples: Tensor,
                 on_block=None) -> None:
    run_blockwise(model, samples, layers, WandaStep(config), config.batch_size, on_block)


WANDA = unstructured_step(WandaConfig, wanda_prune_, True, "Wanda: |W|·‖X‖ per output row (arXiv 2306.11695)")
