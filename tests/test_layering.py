"""Dependencies point one way (DESIGN.md): core imports nothing of ours; quant, pruning and
distillation build on core (pruning never reaches into quant); engine and parallel never ask which
algorithm made a model; server, eval, api, workflows and commands sit on top. And the import graph
of slimlm's modules, counting imports inside functions too, has no circles."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "slimlm"
TOP = {"api", "workflows", "presets", "cli", "__init__", "__main__"}
ALLOWED = {
    "core": {"core"},
    "quant": {"core", "quant"},
    "pruning": {"core", "pruning"},  # not "prune": that name is the public verb slimlm.prune
    "distillation": {"core", "quant", "distillation"},  # not "distill": the verb slimlm.distill
    "engine": {"core", "engine"},
    "parallel": {"core", "engine", "parallel"},
    "exporters": {"core", "quant", "eval", "exporters"},  # eval: the KL a re-quantization costs
    "planner": {"core", "quant", "pruning", "engine", "eval", "planner", "api", "workflows"},
    "eval": {"core", "engine", "eval"},
    "server": {"__init__", "core", "engine", "parallel", "server"},
    "testing": {"core", "testing"},
    # commands parse flags and print; the work is the public API's (verbs, workflows, configs)
    "commands": {"commands", "__init__", "api", "workflows", "presets", "core", "eval", "parallel", "server", "exporters", "planner"},
}


def packages() -> list[str]:
    return sorted(p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").is_file())


def module_name(path: Path) -> str:
    parts = ["slimlm", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def imports_of(path: Path) -> set[str]:
    """slimlm modules imported anywhere in the file (top level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("slimlm."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slimlm"):
            for alias in node.names:  # `from slimlm.core import format` imports the submodule
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return {name for name in found if name in MODULES}


def test_every_package_has_a_rule():
    missing = [p for p in packages() if p not in ALLOWED]
    assert not missing, f"add a layering rule for {missing}"


@pytest.mark.parametrize("package", packages())
def test_imports_point_one_way(package):
    for path in (SRC / package).rglob("*.py"):
        used = {(name.split(".") + ["__init__"])[1] for name in imports_of(path)}
        bad = used - ALLOWED[package]
        assert not bad, f"{path.relative_to(SRC)} imports slimlm.{sorted(bad)}"


def test_the_import_graph_has_no_circles():
    graph = {name: imports_of(path) - {name} for name, path in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_importing_slimlm_is_cheap():
    import subprocess
    import sys

    code = "import sys, slimlm; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"]
