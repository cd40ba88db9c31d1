"""Host memory: weights in huge pages, and returning freed memory to the operating system.

Huge pages: a decode step streams every weight once, and with 4 KiB pages the CPU walks a page
table entry per 4 KiB and its prefetchers stop at every page boundary. In 2 MiB transparent huge
pages the same read runs faster (this 2-core VM: 55 against 42 GB/s summing 256 MB, alternating).
Linux gives them to a private anonymous mapping advised with MADV_HUGEPAGE (the default "madvise"
setting of /sys/kernel/mm/transparent_hugepage/enabled); torch's own allocator does not ask for
them (unless THP_MEM_ALLOC_ENABLE is set before its first allocation, which rounds every large
buffer up to 2 MiB). `hugepage_empty` maps one buffer per tensor, so nothing is rounded up beyond
4 KiB and each tensor is freed on its own; elsewhere, for small tensors, or with SLIMLM_HUGEPAGES=0,
it is `torch.empty`. Loading puts every weight there; so do the kernels' repacked copies. A model made
or changed in memory (quantized, pruned, built by the caller) has its weights in torch's allocator:
`move_to_hugepages` copies them over, one tensor at a time, when the engine takes the model
(`benchmarks/hugepages.py`, "moved" against "ordinary": 1.205x on a 1.1B int4 model, 2 threads).

Freed memory between calibration blocks:

glibc's malloc raises its mmap threshold after large buffers are freed, so later tensors come from
the heap and freed blocks' float weights stay in the process's resident set: quantizing a model
block by block would then look (and, for other processes, be) as large as the float model plus the
quantized one. `malloc_trim(0)` hands the free heap pages back; elsewhere this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os
import sys
import weakref

HUGE_PAGE = 2 << 20
_MAPPED: dict[int, int] = {}  # start address -> bytes of each live mapping made by `hugepage_empty`


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


def hugepages_available() -> bool:
    """Linux with the madvise call Python exposes; SLIMLM_HUGEPAGES=0 turns them off (for comparisons)."""
    return (sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS")
            and os.environ.get("SLIMLM_HUGEPAGES", "1") != "0")


def hugepage_empty(shape, dtype):
    """An uninitialised CPU tensor in memory advised for transparent huge pages where it is at least
    one huge page and the OS offers them; else `torch.empty`. Its storage is its own mapping (freed
    with the tensor)."""
    import torch

    numel = 1
    for n in shape:
        numel *= int(n)
    nbytes = numel * dtype.itemsize
    if nbytes < HUGE_PAGE or not hugepages_available():
        return torch.empty(shape, dtype=dtype)
    try:
        buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buffer.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):  # no such mapping or advice here: plain memory
        return torch.empty(shape, dtype=dtype)
    import warnings

    with warnings.catch_warnings():  # frombuffer warns about non-writable buffers; this one is writable
        warnings.simplefilter("ignore")
        out = torch.frombuffer(buffer, dtype=dtype, count=numel).view(shape)
    start = out.data_ptr()
    _MAPPED[start] = nbytes
    weakref.finalize(buffer, _MAPPED.pop, start, None)  # the storage holds the buffer: freed together
    return out


def hugepage_zeros(shape, dtype):
    """`hugepage_empty`, zeroed (a fresh mapping already reads as zeros, and its pages are only
    committed when written: a large KV cache costs memory as it fills)."""
    out = hugepage_empty(shape, dtype)
    return out if in_hugepages(out) else out.zero_()


def in_hugepages(t) -> bool:
    """Whether t's storage is a mapping made by `hugepage_empty`."""
    return t.device.type == "cpu" and t.untyped_storage().data_ptr() in _MAPPED


def move_to_hugepages(module) -> int:
    """Copy each CPU parameter and buffer of `module` that fills at least a huge page, and is not in
    one of `hugepage_empty`'s mappings yet, into one; values, dtypes and ties (a tensor held by two
    modules, a parameter shared by two) stay as they were. Tensors that are views into a larger
    storage, or of a tensor subclass, are left alone. Returns the bytes moved (0 where huge pages are
    off). The old memory is freed when nothing else holds it, and handed back to the OS."""
    import torch

    if not hugepages_available():
        return 0
    moved: dict[int, object] = {}  # old storage address -> its copy
    total = 0
    with torch.no_grad():
        for sub in module.modules():
            for table in (sub._parameters, sub._buffers):
                for name, t in table.items():
                    data = t.data if isinstance(t, torch.nn.Parameter) else t
                    if (type(data) is not torch.Tensor or data.device.type != "cpu" or data.nbytes < HUGE_PAGE
                            or in_hugepages(data) or not data.is_contiguous() or data.storage_offset()
                            or data.untyped_storage().nbytes() != data.nbytes):
                        continue
                    key = data.untyped_storage().data_ptr()
                    if key not in moved:
                        copy = hugepage_empty(data.shape, data.dtype)
                        if not in_hugepages(copy):  # the OS refused the mapping: leave everything as it is
                            return total
                        moved[key] = copy.copy_(data)
                        total += data.nbytes
                    if isinstance(t, torch.nn.Parameter):
                        t.data = moved[key]
                    else:
                        table[name] = moved[key]
    if total:
        moved.clear()
        release_freed_memory()
    return total


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
