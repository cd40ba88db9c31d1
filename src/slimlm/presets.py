"""Named compression presets (recipes as data): what `slimlm compress` runs for each variant.

A recipe is a list of steps, each `{"method": <registered method>, ...settings}`.
"""

from __future__ import annotations

from typing import Any

from slimlm.core.errors import SlimError

Recipe = list[dict[str, Any]]

PRESETS: dict[str, Recipe] = {
    "fp32": [{"method": "cast", "dtype": "float32"}],
    "bf16": [{"method": "cast", "dtype": "bfloat16"}],
    "fp16": [{"method": "cast", "dtype": "float16"}],
    "int8": [{"method": "rtn", "bits": 8, "group_size": None, "symmetric": True}],
    "int4": [{"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}],
    "int4-g128": [{"method": "rtn", "bits": 4, "group_size": 128, "symmetric": False}],
    "int3": [{"method": "rtn", "bits": 3, "group_size": 32, "symmetric": False}],
    "int2": [{"method": "rtn", "bits": 2, "group_size": 32, "symmetric": False}],
    "log4": [{"method": "rtn", "format": "log", "bits": 4, "group_size": 32, "symmetric": True}],
    "fp8": [{"method": "rtn", "format": "fp8", "bits": 8, "group_size": None, "symmetric": True}],
    "gptq-int4": [{"method": "gptq", "bits": 4, "group_size": 32, "symmetric": False}],
    "gptq-int3": [{"method": "gptq", "bits": 3, "group_size": 32, "symmetric": False}],
    "awq-int4": [{"method": "awq", "bits": 4, "group_size": 32, "symmetric": False}],
    "awq-int3": [{"method": "awq", "bits": 3, "group_size": 32, "symmetric": False}],
    "w8a8": [{"method": "smoothquant", "alpha": 0.5}],
}
DEFAULT_VARIANTS = ("fp32", "bf16", "int8", "int4")


def preset(name: str, calib: str | None = None) -> Recipe:
    """The recipe of variant `name` (a copy); `calib` sets the calibration text of its calibrated steps."""
    from slimlm.core.steps import STEPS

    if name not in PRESETS:
        raise SlimError(f"unknown variant '{name}'; valid: {', '.join(PRESETS)}")
    recipe = [dict(step) for step in PRESETS[name]]
    if calib is not None:
        for step in recipe:
            if STEPS.get(step["method"]).calibrated:
                step["calib"] = calib
    return recipe


def describe(recipe: Recipe) -> str:
    """A short human label for a recipe, e.g. 'rtn int4 g32 asym', from each step's config."""
    from slimlm.core.steps import STEPS

    parts = []
    for step in recipe:
        settings = {k: v for k, v in step.items() if k not in ("method", "version")}
        parts.append(STEPS.get(step["method"]).config_cls.from_dict(settings).describe())
    return " + ".join(parts)
