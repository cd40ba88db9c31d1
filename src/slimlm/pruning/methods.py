"""Registry of pruning methods: name -> (config class, function that prunes a model in place).

`slimlm.prune(model, "wanda", sparsity=0.5, calibration=ids)` looks the name up here. Calibrated
methods get token windows (n, T); the others ignore them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from slimlm.core.config import Config
from slimlm.core.registry import Registry


@dataclass(frozen=True)
class Pruner:
    config_cls: type[Config]
    apply: Callable[..., nn.Module]  # (model, config, samples or None, on_block)
    calibrated: bool | Callable[[Config], bool] = False  # or a function of the config (importance needs data)
    structured: bool = False  # changes shapes (heads, channels, blocks) rather than zeroing weights


PRUNERS: Registry[Pruner] = Registry("pruning method")


def get_pruner(name: str) -> Pruner:
    from slimlm.pruning import magnitude, sparsegpt, structured, taylor, wanda  # noqa: F401  (built-ins register on import)

    return PRUNERS.get(name)


def needs_samples(pruner: Pruner, config: Config) -> bool:
    return pruner.calibrated(config) if callable(pruner.calibrated) else pruner.calibrated
