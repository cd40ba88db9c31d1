"""C++ extensions compiled at first use through `torch.utils.cpp_extension.load_inline`.

Each is built once per source and CPU (the module name carries a hash of the source and the CPU
flags, since it is compiled with -march=native) and cached by torch. Without a C++ compiler, or
with SLIMLM_NO_CPP=1, `load_cpp` returns None and callers take their pure-PyTorch path; a broken
toolchain never breaks inference.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def load_cpp(name: str, source: Path, functions: tuple[str, ...], needed_flags: tuple[str, ...] = ()):
    """The compiled module `name` exporting `functions` from `source`, or None where it cannot be
    built or run here (no compiler, a CPU without `needed_flags`, SLIMLM_NO_CPP set)."""
    if os.environ.get("SLIMLM_NO_CPP"):
        return None
    flags = cpu_flags()
    if not all(f in flags for f in needed_flags):
        return None
    if not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
        log.info("no C++ compiler found; %s is off (PyTorch fallbacks run instead)", name)
        return None
    text = source.read_text()
    digest = hashlib.sha256((text + " ".join(sorted(flags))).encode()).hexdigest()[:12]
    try:
        from torch.utils.cpp_extension import load_inline

        _clear_stale_lock(f"{name}_{digest}")
        return load_inline(
            name=f"{name}_{digest}", cpp_sources=[text], functions=list(functions),
            extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - any build failure means: use the fallback
        log.warning("could not build %s (%s); using the PyTorch fallback", name, str(e).splitlines()[0])
        return None


STALE_LOCK_SECONDS = 300  # a build takes well under a minute here


def _clear_stale_lock(module: str) -> None:
    """torch waits forever on the build lock of a process that was killed while compiling (Ctrl-C
    during the first run): remove a lock older than any real build."""
    import time

    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = Path(_get_build_directory(module, False)) / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            log.warning("removing the stale build lock %s (left by an interrupted build)", lock)
            lock.unlink(missing_ok=True)
    except Exception:  # noqa: BLE001 - best effort; torch's own build then behaves as before
        pass
