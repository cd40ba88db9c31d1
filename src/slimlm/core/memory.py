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
