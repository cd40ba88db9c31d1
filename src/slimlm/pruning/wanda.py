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
from slimlm.pruning import masks as M
from slimlm.pruning.config import PruneConfig
from slimlm.pruning.methods import PRUNERS, Pruner
from slimlm.pruning.unstructured import layer_weight, mask_for


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
        w = layer_weight(module)
        M.apply_mask_(w, mask_for(wanda_scores(w, self.norms.pop(name).to(w.device)), self.config, "row"))
        return None


def wanda_prune_(model: nn.Module, config: PruneConfig, samples: Tensor, on_block=None) -> nn.Module:
    if config.scope == "global" and not config.nm:
        from slimlm.core.errors import SlimError

        raise SlimError("wanda compares weights within a row or a layer, not globally; use scope row or layer")
    return run_blockwise(model, samples, config.targets(model), WandaStep(config), config.batch_size, on_block)


PRUNERS.register("wanda")(Pruner(PruneConfig, wanda_prune_, calibrated=True))
