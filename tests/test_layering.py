"""Dependencies point one way (DESIGN.md): core imports nothing of ours; quant/prune/distill import
core; engine and parallel never ask which algorithm made a model; serve/eval/api/commands sit on top."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "slimlm"
ALLOWED = {
    "core": {"core"},
    "quant": {"core", "quant"},
    "pruning": {"core", "quant", "pruning"},  # not "prune": that name is the public verb slimlm.prune
    "distillation": {"core", "quant", "pruning", "distillation"},  # not "distill": the verb slimlm.distill
    "engine": {"core", "engine"},
    "parallel": {"core", "engine", "parallel"},
    "testing": {"core", "testing"},
}


def slimlm_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "slimlm" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package):
    folder = SRC / package
    if not folder.exists():
        pytest.skip(f"{package} not written yet")
    for path in folder.rglob("*.py"):
        bad = slimlm_imports(path) - ALLOWED[package]
        assert not bad, f"{path.relative_to(SRC)} imports slimlm.{sorted(bad)}"


def test_importing_slimlm_is_cheap():
    import subprocess
    import sys

    code = "import sys, slimlm; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"]
