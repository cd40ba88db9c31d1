"""Recipes as data: an ordered list of steps, each `{method: <registered name>, ...settings}`.

Recipes are read from and written to YAML (what users edit and what a saved model records);
settings are validated by the config class of each step's method when the step runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from slimlm.core.errors import SlimError

Recipe = list[dict[str, Any]]


def validate_recipe(recipe: Any, where: str = "recipe") -> Recipe:
    if isinstance(recipe, dict) and "steps" in recipe:
        recipe = recipe["steps"]
    if not isinstance(recipe, list) or not recipe:
        raise SlimError(f"{where} must be a non-empty list of steps like '- method: rtn' (or a mapping with 'steps:')")
    for i, step in enumerate(recipe, 1):
        if not isinstance(step, dict) or not isinstance(step.get("method"), str):
            raise SlimError(f"{where} step {i} needs a 'method' name, e.g. '- method: rtn'; got {step!r}")
    return [dict(step) for step in recipe]


def load_recipe(path: str | os.PathLike) -> Recipe:
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise SlimError(f"recipe file '{file}' does not exist; pass a YAML file of steps")
    try:
        data = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SlimError(f"recipe file '{file}' is not valid YAML ({str(e).splitlines()[0]}); fix its syntax") from None
    return validate_recipe(data, f"recipe file '{file}'")


def dump_recipe(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump({"steps": recipe}, sort_keys=False)
