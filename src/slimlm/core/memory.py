"""Returning freed memory to the operating system between calibration blocks.

glibc's malloc raises its mmap threshold after large buffers are freed, so later tensors come from
the heap and freed blocks' float weights stay in the process's resident set: quantizing a model
block by block would then look (and, for other processes, be) as large as the float model plus the
quantized one. `malloc_trim(0)` hands the free heap pages back; elsewhere this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc `malloc_trim`); no-op where unavailable."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def available_bytes() -> int | None:
    """Memory the OS can still hand out (MemAvailable of /proc/meminfo), or None where unknown."""
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(nbytes: int, what: str, fix: str, device=None) -> None:
    """Refuse, before allocating, a buffer of `nbytes` that the device cannot hold ('what' needs X GB;
    Y GB are available: `fix`). On a GPU the free device memory counts; elsewhere MemAvailable."""
    from slimlm.core.errors import SlimError

    free = None
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        import torch

        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = available_bytes()
    if free is not None and nbytes > free:
        raise SlimError(f"{what} needs {nbytes / 1e9:.1f} GB and {free / 1e9:.1f} GB are available; {fix}")
