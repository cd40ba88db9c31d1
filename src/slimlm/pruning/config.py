"""Pruning settings shared by every unstructured/n:m method."""

from __future__ import annotations

import dataclasses

from torch import nn

from slimlm.core.config import Config, check
from slimlm.core.targeting import select_linear
from slimlm.pruning.masks import parse_pattern
from slimlm.quant.calibration import CalibrationFields

SCOPES = ("row", "layer", "global")


@dataclasses.dataclass(frozen=True)
class PruneConfig(CalibrationFields, Config):
    """What to prune and how much.

    sparsity: fraction of each targeted weight set to zero, in [0, 1). pattern: 'n:m' keeps n of
    every m consecutive inputs instead (sparsity is then 1 - n/m and the `sparsity` field is ignored).
    scope: which weights compete for survival: each output row ('row'), the whole layer ('layer'),
    or all targeted layers together ('global'); None takes the method's default."""

    name = "prune"
    sparsity: float = 0.5
    pattern: str | None = None
    scope: str | None = None
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    block_size: int = 128  # SparseGPT: columns per lazy-update block (and mask-selection block)
    damp: float = 0.01  # SparseGPT: Hessian dampening, as GPTQ

    def __post_init__(self) -> None:
        CalibrationFields.__post_init__(self)
        check(isinstance(self.sparsity, (int, float)) and not isinstance(self.sparsity, bool)
              and 0 <= self.sparsity < 1, f"sparsity {self.sparsity!r} must be in [0, 1), e.g. 0.5")
        if self.pattern is not None:
            try:
                parse_pattern(str(self.pattern))
            except ValueError as e:
                check(False, str(e))
        check(self.scope is None or self.scope in SCOPES, f"scope {self.scope!r} must be one of {', '.join(SCOPES)}")
        for field in ("include", "exclude"):
            value = getattr(self, field)
            if isinstance(value, str):
                value = (value,)
            elif isinstance(value, list):
                value = tuple(value)
            object.__setattr__(self, field, value)
            check(isinstance(value, tuple) and all(isinstance(g, str) for g in value),
                  f"{field} must be a list of name globs, not {value!r}")
        check(isinstance(self.block_size, int) and self.block_size >= 1, f"block_size {self.block_size!r} must be >= 1")
        check(isinstance(self.damp, (int, float)) and 0 < self.damp < 1, f"damp {self.damp!r} must be in (0, 1)")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern) if self.pattern else None

    @property
    def target_sparsity(self) -> float:
        return 1 - self.nm[0] / self.nm[1] if self.nm else float(self.sparsity)

    def targets(self, model: nn.Module) -> dict[str, nn.Module]:
        layers = select_linear(model, self.include, self.exclude)
        if self.nm:
            m = self.nm[1]
            bad = [name for name, layer in layers.items() if _in_features(layer) % m]
            check(not bad, f"an {self.pattern} pattern needs input sizes divisible by {m}; {', '.join(bad[:3])} "
                           "are not (exclude them)")
        return layers


def _in_features(layer: nn.Module) -> int:
    w = layer.weight
    return w.shape[0] if type(layer).__name__ == "Conv1D" else w.shape[1]
