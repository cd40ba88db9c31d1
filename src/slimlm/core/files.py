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


class SafetensorsReader:
    """A (possibly sharded) safetensors checkpoint read tensor by tensor, whole or in slices, so a
    process can take just its part of every tensor (tensor parallelism) without holding the rest."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path, self.where, self.aliases = path, {}, {}
        self._open = {}
        for name in safetensors_files(path):
            try:
                handle = safe_open(path / name, framework="pt")
                self.aliases.update(json.loads((handle.metadata() or {}).get("aliases", "{}")))
            except Exception as e:  # SafetensorError / OSError: corrupt, truncated or missing shard
                raise SlimError(f"weights file {path / name} is corrupt or missing ({first_line(e)}); re-save the model") from None
            self._open[name] = handle
            self.where.update({key: name for key in handle.keys()})

    def names(self) -> set[str]:
        return set(self.where) | set(self.aliases)

    def _handle(self, name: str):
        key = self.aliases.get(name, name)
        if key not in self.where:
            raise SlimError(f"weights in {self.path} have no tensor '{name}'; the folder does not match its config")
        return self._open[self.where[key]], key

    def read(self, name: str) -> torch.Tensor:
        handle, key = self._handle(name)
        return handle.get_tensor(key)

    def read_slice(self, name: str, dim: int, ranges: list[tuple[int, int]]) -> torch.Tensor:
        """Index ranges [a, b) of tensor `name` along `dim` (0 or 1), concatenated; only they are read."""
        handle, key = self._handle(name)
        part = handle.get_slice(key)
        pieces = [part[a:b] if dim == 0 else part[:, a:b] for a, b in ranges]
        return pieces[0].contiguous() if len(pieces) == 1 else torch.cat(pieces, dim)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, memory-mapped."""
    from safetensors.torch import load_file

    files = safetensors_files(path)
    state: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name in files:
        try:
            state.update(load_file(path / name))
            aliases.update(_read_aliases(path / name))
        except Exception as e:  # SafetensorError / OSError: corrupt, truncated or missing shard
            raise SlimError(f"weights file {path / name} is corrupt or missing ({first_line(e)}); re-save the model") from None
    for alias, target in aliases.items():  # tied tensors were stored once; a target may sit in any shard
        if target not in state:
            raise SlimError(f"weights in {path} name '{alias}' as a copy of missing '{target}'; the folder is corrupt")
        state.setdefault(alias, state[target])
    return state


def _read_aliases(file: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("aliases", "{}"))


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
