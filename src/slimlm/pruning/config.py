"""Pruning settings: `PruneConfig` for every unstructured/n:m method, one subclass per method (the
step table keys steps by config class, and the subclass's `name` is the method's alias)."""

from __future__ import annotations

import dataclasses

from torch import nn

from slimlm.core.calibrate import CalibrationFields
from slimlm.core.config import Config, check, field
from slimlm.core.layers import in_features
from slimlm.core.targeting import TargetFields
from slimlm.pruning.masks import parse_pattern

SCOPES = ("row", "layer", "global")


@dataclasses.dataclass(frozen=True)
class PruneConfig(CalibrationFields, TargetFields, Config):
    """What to prune and how much.

    sparsity: fraction of each targeted weight set to zero, in [0, 1). pattern: 'n:m' keeps n of
    every m consecutive inputs instead (sparsity is then 1 - n/m and the `sparsity` field is ignored).
    scope: which weights compete for survival: each output row ('row'), the whole layer ('layer'),
    or all targeted layers together ('global'); None takes the method's default."""

    name = "prune"
    default_scope = "layer"
    sparsity: float = field(0.5, "fraction of each layer's weights set to zero, in [0, 1)")
    pattern: str | None = field(None, "n:m sparsity instead, e.g. 2:4 (keep 2 of every 4 inputs)")
    scope: str | None = field(None, "which weights compete: each output row, each layer, or all layers (global); "
                                    "default: the method's")
    block_size: int = field(128, "SparseGPT: columns per lazy-update block (and mask-selection block)")
    damp: float = field(0.01, "SparseGPT: Hessian dampening, as GPTQ")

    def __post_init__(self) -> None:
        CalibrationFields.__post_init__(self)
        TargetFields.__post_init__(self)
        check(isinstance(self.sparsity, (int, float)) and not isinstance(self.sparsity, bool)
              and 0 <= self.sparsity < 1, f"sparsity {self.sparsity!r} must be in [0, 1), e.g. 0.5")
        if self.pattern is not None:
            try:
                parse_pattern(str(self.pattern))
            except ValueError as e:
                check(False, str(e))
        check(self.scope is None or self.scope in SCOPES, f"scope {self.scope!r} must be one of {', '.join(SCOPES)}")
        check(isinstance(self.block_size, int) and self.block_size >= 1, f"block_size {self.block_size!r} must be >= 1")
        check(isinstance(self.damp, (int, float)) and 0 < self.damp < 1, f"damp {self.damp!r} must be in (0, 1)")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern) if self.pattern else None

    @property
    def target_sparsity(self) -> float:
        return 1 - self.nm[0] / self.nm[1] if self.nm else float(self.sparsity)

    def describe(self) -> str:
        return f"{self.name} {self.pattern or f'{self.sparsity:.0%}'}"

    def targets(self, model: nn.Module) -> dict[str, nn.Module]:
        layers = self.select(model)
        if self.nm:
            m = self.nm[1]
            bad = [name for name, layer in layers.items() if in_features(layer) % m]
            check(not bad, f"an {self.pattern} pattern needs input sizes divisible by {m}; {', '.join(bad[:3])} "
                           "are not (exclude them)")
        return layers


@dataclasses.dataclass(frozen=True)
class MagnitudeConfig(PruneConfig):
    name = "magnitude"


@dataclasses.dataclass(frozen=True)
class RandomConfig(PruneConfig):
    name = "random"


@dataclasses.dataclass(frozen=True)
class TaylorConfig(PruneConfig):
    name = "taylor"


@dataclasses.dataclass(frozen=True)
class WandaConfig(PruneConfig):
    name = "wanda"
    default_scope = "row"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.scope != "global" or self.nm is not None,
              "wanda compares weights within a row or a layer, not globally; use scope row or layer")


@dataclasses.dataclass(frozen=True)
class SparseGPTConfig(PruneConfig):
    name = "sparsegpt"
