"""C++ extensions compiled at first use through `torch.utils.cpp_extension.load_inline`.

Each is built once per source, CPU, Python and torch version (the module name carries a hash of
them all, since it is compiled with -march=native against this torch) into slimlm's own cache:
`$SLIMLM_CACHE/extensions`, else `$XDG_CACHE_HOME/slimlm/extensions`, else
`~/.cache/slimlm/extensions`, one folder per module. Without a C++ compiler, or with
SLIMLM_NO_CPP=1, `load_cpp` returns None and callers take their pure-PyTorch path; so it does, with
one warning line, when the source is missing or unreadable, the cache is not writable, or the build
fails: a broken install or toolchain never breaks inference. A first build prints one line to
stderr (it pauses the command for 20-60 s); the cache outlives reinstalls of slimlm, since a
module's name depends on its source, not on the package's version or install path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

STALE_LOCK_SECONDS = 300  # a build takes well under a minute here


def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cache_dir() -> Path:
    """The folder holding one build folder per compiled module (not created here)."""
    if os.environ.get("SLIMLM_CACHE"):
        return Path(os.environ["SLIMLM_CACHE"]) / "extensions"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "slimlm" / "extensions"


@functools.cache
def load_cpp(name: str, source: Path, functions: tuple[str, ...], needed_flags: tuple[str, ...] = ()):
    """The compiled module `name` exporting `functions` from `source`, or None where it cannot be
    built or run here (no compiler, a CPU without `needed_flags`, SLIMLM_NO_CPP set, a missing
    source, an unwritable cache, a failed build; the last three log one warning)."""
    if os.environ.get("SLIMLM_NO_CPP"):
        return None
    flags = cpu_flags()
    if not all(f in flags for f in needed_flags):
        return None
    if not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
        log.info("no C++ compiler found; %s is off (PyTorch fallbacks run instead)", name)
        return None
    try:
        import torch
        from torch.utils.cpp_extension import load_inline

        text = Path(source).read_text()
        tags = [text, " ".join(sorted(flags)), torch.__version__, platform.python_version()]
        module = f"{name}_{hashlib.sha256(chr(0).join(tags).encode()).hexdigest()[:12]}"
        folder = cache_dir() / module
        folder.mkdir(parents=True, exist_ok=True)
        _clear_stale_lock(folder)
        if not any(folder.glob("*.so")):  # a first build takes 20-60 s: say why the command pauses
            print(f"slimlm: compiling {name} for this CPU (once; about a minute; cached in {folder.parent})",
                  file=sys.stderr, flush=True)
        return load_inline(
            name=module, cpp_sources=[text], functions=list(functions), build_directory=str(folder),
            extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - whatever went wrong, the PyTorch fallback runs instead
        log.warning("could not build %s (%s); using the PyTorch fallback", name, _first_line(e))
        log.debug("the full error building %s: %s", name, e)
        return None


def _first_line(e: BaseException) -> str:
    """The error's first non-empty line, cut short (a compiler's message can span pages)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else type(e).__name__
    if text.startswith("Error building extension") and ": " in text:
        text = text.split(": ", 1)[0] + " (the compiler's output is logged at DEBUG level)"  # not ninja's command line
    return text if len(text) <= 300 else text[:297] + "..."


def _clear_stale_lock(folder: Path) -> None:
    """torch waits forever on the build lock of a process that was killed while compiling (Ctrl-C
    during the first run): remove a lock in `folder` older than any real build."""
    lock = folder / "lock"
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            log.warning("removing the stale build lock %s (left by an interrupted build)", lock)
            lock.unlink(missing_ok=True)
    except FileNotFoundError:
        pass
