"""SmoothQuant W8A8 (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models", arXiv 2211.10438) as a calibrated step.

Activation outliers sit in a few channels, which makes per-token int8 activations lossy. Per block,
for each group of layers reading the same input x, SmoothQuant migrates difficulty from the
activations to the weights with per-channel factors (§4, Eq. 4)

    s_j = max|x_j|^α / max|W_j|^(1−α)      (max|W_j| over the rows of every layer in the group)

folded into the producer of x (`smoothing.find_scale_groups`: the preceding norm, or a linear
layer such as up_proj for down_proj), then every targeted layer becomes a W8A8Linear (int8
per-channel weights, dynamic per-token int8 activations). α (`alpha`, the migration strength)
is 0.5 by default as in the paper; layers whose input cannot be smoothed are quantized unsmoothed.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import Tensor, nn

from slimlm.core.calibrate import CalibrationFields, replay_observing, run_blockwise
from slimlm.core.config import Config, check, field
from slimlm.core.distributed import max_
from slimlm.core.layers import weight_matrix
from slimlm.core.steps import Step
from slimlm.core.targeting import TargetFields
from slimlm.quant.linear import check_finite_weight
from slimlm.quant.smoothing import find_scale_groups, fold_scales_
from slimlm.quant.w8a8 import W8A8Linear

log = logging.getLogger(__name__)


def smoothing_factors(x_absmax: Tensor, w_absmax: Tensor, alpha: float) -> Tensor:
    """s (K,) from the per-channel max|x| (K,) and max|W| (K,); channels that never fire keep s = 1."""
    s = x_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return torch.where(x_absmax > 0, s, torch.ones_like(s))


@dataclasses.dataclass(frozen=True)
class SmoothQuantConfig(CalibrationFields, TargetFields, Config):
    name = "smoothquant"
    alpha: float = field(0.5, "SmoothQuant: migration strength in [0, 1] (0.5 is the paper's default)")
    smooth: bool = field(True, "SmoothQuant: migrate activation outliers into the weights (false: plain W8A8)")

    def __post_init__(self) -> None:
        CalibrationFields.__post_init__(self)
        TargetFields.__post_init__(self)
        check(isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and 0 <= self.alpha <= 1,
              f"alpha {self.alpha!r} must be in [0, 1] (migration strength; 0.5 is the paper's default)")
        check(isinstance(self.smooth, bool), f"smooth must be true or false, got {self.smooth!r}")

    def describe(self) -> str:
        return f"smoothquant w8a8 α={self.alpha}" if self.smooth else "w8a8 (unsmoothed)"


class SmoothQuantStep:
    def __init__(self, config: SmoothQuantConfig) -> None:
        self.config = config
        self.summary: list[dict] = []

    @torch.no_grad()
    def begin_block(self, block: nn.Module, prefix: str, names: list[str], inputs: list[tuple]) -> None:
        if not self.config.smooth:
            return
        groups, orphans = find_scale_groups(block, prefix, names, inputs)
        if orphans:
            log.info("SmoothQuant: no producer can absorb scales for %s; their activations are not smoothed", ", ".join(orphans))
        modules = dict(block.named_modules(prefix=prefix.rstrip(".")))
        absmax: dict[str, Tensor] = {}

        def record(key: str, x: Tensor) -> None:
            m = x.detach().reshape(-1, x.shape[-1]).abs().amax(0).float()  # (K,)
            absmax[key] = torch.maximum(absmax[key], m) if key in absmax else m

        replay_observing(block, inputs, {modules[g.layers[0]]: (lambda x, key=g.producer: record(key, x)) for g in groups})
        for g in groups:
            layers = [modules[n] for n in g.layers]
            for n, m in zip(g.layers, layers):
                check_finite_weight(n, m.weight)
            w_absmax = torch.cat([weight_matrix(m).abs().float() for m in layers]).amax(0)  # (K,)
            x_absmax = max_(absmax.pop(g.producer))  # over every process's calibration rows
            s = smoothing_factors(x_absmax, w_absmax.to(x_absmax.device), self.config.alpha)
            fold_scales_(modules[g.producer], layers, s)
            self.summary.append({"producer": g.producer, "layers": g.layers,
                                 "act_range_before": float(x_absmax.max() / x_absmax.clamp(min=1e-8).median()),
                                 "act_range_after": float((x_absmax / s).max() / (x_absmax / s).clamp(min=1e-8).median())})

    def observe(self, name: str, module: nn.Module, inputs: Tensor) -> None:
        pass  # dynamic per-token activation scales need no statistics beyond the smoothing pass

    def compress(self, name: str, module: nn.Module) -> W8A8Linear:
        check_finite_weight(name, module.weight)
        return W8A8Linear.from_float(module)


def smoothquant_(model: nn.Module, config: SmoothQuantConfig, samples: Tensor, on_block=None) -> nn.Module:
    """Smooth and quantize the selected linear layers to W8A8 using calibration samples (n, T); in place."""
    return run_blockwise(model, samples, config.select(model), SmoothQuantStep(config),
                         config.batch_size, on_block)


SMOOTHQUANT = Step(SmoothQuantConfig, smoothquant_, "quantize", calibrated=True,
                   summary="SmoothQuant W8A8: int8 weights and activations, outliers migrated (arXiv 2211.10438)")
