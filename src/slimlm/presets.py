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
CALIBRATED = {"gptq", "awq", "smoothquant"}
DEFAULT_VARIANTS = ("fp32", "bf16", "int8", "int4")


def preset(name: str) -> Recipe:
    if name not in PRESETS:
        raise SlimError(f"unknown variant '{name}'; valid: {', '.join(PRESETS)}")
    return [dict(step) for step in PRESETS[name]]


def describe(recipe: Recipe) -> str:
    """A short human label for a recipe, e.g. 'rtn int4 g32 asym'."""
    parts = []
    for step in recipe:
        if step["method"] == "cast":
            parts.append(step.get("dtype", "bfloat16"))
        elif step["method"] == "smoothquant":
            parts.append(f"smoothquant w8a8 α={step.get('alpha', 0.5)}")
        elif "sparsity" in step:
            amount = step.get("pattern") or f"{step['sparsity']:.0%}"
            parts.append(f"{step['method']} {amount}")
        elif "bits" in step:
            group = f"g{step['group_size']}" if step.get("group_size") else "per-channel"
            sym = "sym" if step.get("symmetric") else "asym"
            kind = step.get("format", "int")
            code = f"int{step['bits']} {group} {sym}" if kind == "int" else \
                f"{kind}{step['bits'] if kind == 'log' else ''} {group}"
            overrides = f" ({len(step['overrides'])} overrides)" if step.get("overrides") else ""
            parts.append(f"{step['method']} {code}{overrides}")
        else:
            settings = ", ".join(f"{k}={v}" for k, v in step.items() if k not in ("method", "version"))
            parts.append(f"{step['method']}({settings})")
    return " + ".join(parts)
