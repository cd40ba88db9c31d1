"""Files of a saved model: safetensors checkpoints (sharded, tied tensors stored once) and folders
written atomically (a temporary folder beside the target, renamed into place)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from slimlm.core.errors import SlimError
from slimlm.core.memory import hugepage_empty


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def safetensors_files(path: Path) -> list[str]:
    """The files of a (possibly sharded) safetensors checkpoint."""
    index = path / "model.safetensors.index.json"
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    except (json.JSONDecodeError, KeyError, AttributeError):
        raise SlimError(f"{index} is not a valid safetensors index; re-save the model") from None


# safetensors dtype names -> torch dtypes (the format's header, https://github.com/huggingface/safetensors)
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_BLOCK_BYTES = 8 << 20  # a column slice is read this many bytes of whole rows at a time


class SafetensorsReader:
    """A (possibly sharded) safetensors checkpoint read tensor by tensor, whole or in slices, so a
    process can take just its part of every tensor (tensor and pipeline parallelism) without holding
    the rest.

    The bytes are read with plain file reads at the offsets the header gives, not through a memory
    map: a slice of columns touches every page of a row-major matrix, and a mapped page (with the
    kernel's fault-around, its neighbours too) counts in the process's resident memory, so with a map
    every rank would appear to hold every matrix it slices. Read, a rank's memory is its own slices
    (plus one block of rows in flight); the file stays in the page cache, shared by all ranks."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path, self.where, self.aliases = path, {}, {}
        self.info: dict[str, dict] = {}  # file -> the header's entries (dtype, shape, data_offsets)
        self.start: dict[str, int] = {}  # file -> offset of its data section
        for name in safetensors_files(path):
            try:
                with safe_open(path / name, framework="pt") as handle:  # validates the header
                    self.aliases.update(json.loads((handle.metadata() or {}).get("aliases", "{}")))
                    keys = list(handle.keys())
                with open(path / name, "rb") as f:
                    size = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(size))
            except Exception as e:  # SafetensorError / OSError: corrupt, truncated or missing shard
                raise SlimError(f"weights file {path / name} is corrupt or missing ({first_line(e)}); re-save the model") from None
            header.pop("__metadata__", None)
            self.info[name], self.start[name] = header, 8 + size
            self.where.update({key: name for key in keys})

    def names(self) -> set[str]:
        return set(self.where) | set(self.aliases)

    def _entry(self, name: str) -> tuple[str, dict]:
        key = self.aliases.get(name, name)
        if key not in self.where:
            raise SlimError(f"weights in {self.path} have no tensor '{name}'; the folder does not match its config")
        file = self.where[key]
        return file, self.info[file][key]

    def shape(self, name: str) -> tuple[list[int], torch.dtype]:
        _, entry = self._entry(name)
        return list(entry["shape"]), _ST_DTYPES[entry["dtype"]]

    def nbytes(self, name: str) -> int:
        _, entry = self._entry(name)
        a, b = entry["data_offsets"]
        return b - a

    def _read_into(self, file: str, offset: int, out: torch.Tensor) -> torch.Tensor:
        """Fill the contiguous tensor `out` with the bytes at `offset` of `file`'s data section (read
        straight into it: no intermediate buffer, so nothing is left behind in the heap)."""
        view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        with open(self.path / file, "rb", buffering=0) as f:
            f.seek(self.start[file] + offset)
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise SlimError(f"weights file {self.path / file} is truncated; re-save the model")
                done += n
        return out

    def read(self, name: str) -> torch.Tensor:
        file, entry = self._entry(name)
        out = hugepage_empty(list(entry["shape"]), _ST_DTYPES[entry["dtype"]])
        return self._read_into(file, entry["data_offsets"][0], out)

    def read_slice(self, name: str, dim: int, ranges: list[tuple[int, int]]) -> torch.Tensor:
        """Index ranges [a, b) of tensor `name` along `dim` (0 or 1), concatenated; only they are read
        (for dim 1, whole rows a block at a time, of which the columns are kept)."""
        file, entry = self._entry(name)
        dtype, shape = _ST_DTYPES[entry["dtype"]], list(entry["shape"])
        begin = entry["data_offsets"][0]
        row_bytes = (entry["data_offsets"][1] - begin) // max(shape[0], 1)
        width = sum(b - a for a, b in ranges)
        if dim == 0:
            out, at = hugepage_empty([width, *shape[1:]], dtype), 0
            for a, b in ranges:  # a run of rows is contiguous in the file and in `out`
                self._read_into(file, begin + a * row_bytes, out[at : at + b - a])
                at += b - a
            return out
        out = hugepage_empty([shape[0], width, *shape[2:]], dtype)
        rows = max(1, min(shape[0], _BLOCK_BYTES // max(row_bytes, 1)))
        block = torch.empty([rows, *shape[1:]], dtype=dtype)
        for r in range(0, shape[0], rows):
            n = min(rows, shape[0] - r)
            self._read_into(file, begin + r * row_bytes, block[:n])
            at = 0
            for a, b in ranges:
                out[r : r + n, at : at + b - a] = block[:n, a:b]
                at += b - a
        return out


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, read into memory of their own in
    huge pages where the OS offers them (`hugepage_empty`: a decode step streams them every token);
    a tensor stored once for several names (tied) is one tensor under each."""
    reader = SafetensorsReader(path)
    state: dict[str, torch.Tensor] = {}
    for name in sorted(reader.where):  # file order within each shard
        state[name] = reader.read(name)
    for alias, target in reader.aliases.items():  # tied tensors were stored once; a target may sit in any shard
        if target not in state:
            raise SlimError(f"weights in {path} name '{alias}' as a copy of missing '{target}'; the folder is corrupt")
        state.setdefault(alias, state[target])
    return state


def dedup_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without tensors that share storage (tied embeddings): (state, alias -> kept name)."""
    state, aliases, seen = {}, {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        state[name] = tensor.detach().contiguous().cpu()
    return state, aliases


def write_safetensors(state: dict[str, torch.Tensor], aliases: dict[str, str], folder: Path, max_shard: int) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={**meta, "aliases": json.dumps(aliases)})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        kept = {a: t for a, t in aliases.items() if t in shard}
        save_file(shard, folder / file, metadata={**meta, "aliases": json.dumps(kept)})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def check_output_path(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early, before any work, if the output exists and may not be replaced."""
    out = Path(path).expanduser()
    if out.exists() and not overwrite:
        raise SlimError(f"output folder '{out}' already exists; pass --overwrite (overwrite=True) or choose another path")
    if not out.parent.exists():
        raise SlimError(f"parent folder of '{out}' does not exist; create it or choose another output path")
    if not out.parent.is_dir():
        raise SlimError(f"'{out.parent}' is a file, so '{out}' cannot be created under it; choose another output path")
    if out.exists() and not out.is_dir():
        raise SlimError(f"output '{out}' is a file, not a folder; choose another output path")
    return out


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(out: Path) -> None:
    """Remove `.NAME.tmp-PID` / `.NAME.old-PID` folders beside `out` left by processes that died
    mid-write (a killed save); those of live processes are left alone."""
    for stale in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = stale.name[len(out.name) + 2:].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not _process_alive(int(pid)) and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def normalize_modes_(folder: Path) -> None:
    """Give every file written into `folder` the same permissions (safetensors writes 0600, the others
    are 0666 minus the umask)."""
    mode = 0o666 & ~_umask()
    for f in folder.rglob("*"):
        if f.is_file():
            f.chmod(mode)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path`, on error it is removed."""
    out = check_output_path(path, overwrite)
    remove_stale_temporaries(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    normalize_modes_(tmp)
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file name beside `path`; on success it is renamed to `path`, on error removed
    (so a reader never sees a partly written file at `path`)."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise SlimError(f"output '{out}' is a folder; give a file name (e.g. {out / 'model.gguf'})")
    if out.exists() and not overwrite:
        raise SlimError(f"output file '{out}' already exists; pass --overwrite (overwrite=True) or choose another path")
    if not out.parent.is_dir():
        raise SlimError(f"parent folder of '{out}' does not exist; create it or choose another output path")
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and not _process_alive(int(pid)) and stale.is_file():
            stale.unlink(missing_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.chmod(0o666 & ~_umask())
    tmp.replace(out)


def folder_bytes(path: Path) -> int:
    """Bytes of the weight files in a saved folder (what 'size on disk' means in reports)."""
    return sum(f.stat().st_size for f in path.iterdir() if f.name.endswith((".safetensors", ".bin")))
