"""SparseGPT as a calibrated step: each layer's Hessian from its calibration inputs (shared with
GPTQ, `core/hessian.py`), then `sparsegpt_solver.sparsegpt_prune` (arXiv 2301.00774)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimlm.core.calibrate import run_blockwise
from slimlm.core.hessian import HessianObserver
from slimlm.pruning.config import PruneConfig, SparseGPTConfig
from slimlm.pruning.sparsegpt_solver import sparsegpt_prune
from slimlm.pruning.unstructured import prunable_weight, unstructured_step


class SparseGPTStep(HessianObserver):
    def __init__(self, config: PruneConfig) -> None:
        super().__init__()
        self.config = config

    @torch.no_grad()
    def compress(self, name: str, module: nn.Module) -> None:
        h = self.pop_hessian(name)
        w = prunable_weight(module)
        c = self.config
        pruned = sparsegpt_prune(w.cpu(), h.cpu(), c.target_sparsity, c.nm, c.block_size, c.damp)
        w.copy_(pruned.to(w.dtype))
        return None


def sparsegpt_prune_(model: nn.Module, layers: dict[str, nn.Module], config: PruneConfig, samples: Tensor,
                     on_block=None) -> None:
    run_blockwise(model, samples, layers, SparseGPTStep(config), config.batch_size, on_block)


SPARSEGPT = unstructured_step(SparseGPTConfig, sparsegpt_prune_, True,
                              "SparseGPT: prune and reconstruct with the inverse Hessian (arXiv 2301.00774)")
