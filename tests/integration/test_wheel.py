"""slimlm as a user gets it: build the wheel, install it into a fresh virtual environment, run it there.

A checkout's editable install reads its C++ sources from the checkout, so only an installed wheel
shows whether they ship. To stay quick and offline, the fresh environment reuses this one's
third-party packages (torch, transformers, ...) through a plain path line in a .pth file (such a
line does not run this environment's own .pth files, so its editable slimlm stays invisible) and
gets slimlm only from the wheel, installed with --no-deps --no-index.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 900  # a first run compiles two extensions; a hung build lock must not hang CI forever

# int4 demo model on the engine: which decode step and which kernels run, from where
PROBE = """
import json
import torch
import slimlm
from slimlm.engine.engine import Engine
from slimlm.quant.linear import QuantizedLinear

model, _ = slimlm.load("demo")
slimlm.quantize(model, "rtn", bits=4, group_size=32, symmetric=False)
engine = Engine(model)
logits = engine.prefill(0, torch.arange(8))
engine.decode(torch.tensor([0]), logits.argmax(-1, keepdim=True))
kernels = sorted({m.kernel for m in model.modules() if isinstance(m, QuantizedLinear)})
print(json.dumps({"file": slimlm.__file__, "decode_ops": engine.decode_ops, "reason": engine.fused_reason,
                  "kernels": kernels}))
"""


def _run(argv, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=TIMEOUT, **kwargs)


def _copy_sources(dest: Path) -> Path:
    """What the wheel is built from, copied so the build's build/ and *.egg-info never land in the checkout."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    return dest


def _build_wheel(source: Path, out: Path) -> Path:
    if importlib.util.find_spec("setuptools") is not None:  # offline: build with this environment's setuptools
        flags = ["--no-build-isolation", "--no-index"]
    else:
        flags = []  # pip fetches the build backend itself
    done = _run([sys.executable, "-m", "pip", "wheel", source, "--no-deps", "-w", out, *flags])
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = out.glob("slimlm-*.whl")
    return wheel


def _fresh_venv(folder: Path, wheel: Path) -> Path:
    _run([sys.executable, "-m", "venv", "--without-pip", folder]).check_returncode()
    python = folder / "bin" / "python"
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip()
    outer = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (Path(site) / "_outer_packages.pth").write_text("".join(f"{p}\n" for p in outer))
    done = _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel])
    assert done.returncode == 0, done.stdout + done.stderr
    return folder


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, venv folder, env for its processes, a working folder outside the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(_copy_sources(tmp / "source"), tmp / "dist")
    venv = _fresh_venv(tmp / "venv", wheel)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    work = tmp / "work"
    work.mkdir()
    return wheel, venv, env, work


def test_the_wheel_ships_every_module_cpp_source_and_the_demo_model(installed):
    wheel = installed[0]
    names = set(zipfile.ZipFile(wheel).namelist())
    src = ROOT / "src"
    needed = {p.relative_to(src).as_posix() for p in src.joinpath("slimlm").rglob("*")
              if p.is_file() and "__pycache__" not in p.parts
              and (p.suffix in (".py", ".cpp", ".h", ".cu") or "assets" in p.parts)}
    assert {"slimlm/engine/csrc/decode_ops.cpp", "slimlm/quant/kernels/csrc/avx512_decode.cpp",
            "slimlm/assets/demo/model.safetensors", "slimlm/assets/demo/tokenizer.json"} <= needed
    assert needed - names == set()


def test_compress_int4_runs_from_the_installed_wheel(installed):
    _, venv, env, work = installed
    done = _run([venv / "bin" / "slimlm", "compress", "--variants", "int4", "--no-bench"], cwd=work, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "int4" in done.stdout
    done = _run([venv / "bin" / "slimlm", "compress", "--variants", "int4", "--max-tokens", 256, "--repeats", 1,
                 "--new-tokens", 4, "--prompt-tokens", 8, "--batch-sizes", 1, "--json"], cwd=work, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    (variant,) = json.loads(done.stdout)["variants"]
    assert variant["speed"]["runtime"] == "engine" and variant["speed"]["decode_tps"]["1"] > 0


def test_the_fused_decode_step_runs_from_the_installed_wheel(installed):
    """The C++ sources are read from the installed package and built; the engine takes the fused step
    and, on an AVX-512 CPU, the int4 layers the AVX-512 int8-activation kernel."""
    _, venv, env, work = installed
    done = _run([venv / "bin" / "python", "-c", PROBE], cwd=work, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(probe["file"]).is_relative_to(venv)  # the wheel's slimlm, not the checkout's
    from slimlm.core import cpp_ext
    from slimlm.quant.kernels.cpu_avx512 import NEEDED_FLAGS

    if env.get("SLIMLM_NO_CPP"):
        pytest.skip("SLIMLM_NO_CPP is set: the C++ extensions are off by request")
    if not (shutil.which(env.get("CXX", "c++"), path=env["PATH"]) or shutil.which("g++", path=env["PATH"])):
        pytest.skip("no C++ compiler here, so no fused decode step (compress still ran on PyTorch)")
    assert probe["decode_ops"] == "fused", f"{probe['reason']}\n{done.stderr}"
    if not set(NEEDED_FLAGS) <= cpp_ext.cpu_flags():
        pytest.skip(f"the fused step ran; this CPU lacks {', '.join(set(NEEDED_FLAGS) - cpp_ext.cpu_flags())}")
    assert probe["kernels"] == ["cpu_int4_a8"], done.stderr
