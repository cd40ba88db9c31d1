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


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, memory-mapped."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    except (json.JSONDecodeError, KeyError, AttributeError):
        raise SlimError(f"{index} is not a valid safetensors index; re-save the model") from None
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
    return out


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path`, on error it is removed."""
    out = check_output_path(path, overwrite)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def folder_bytes(path: Path) -> int:
    """Bytes of the weight files in a saved folder (what 'size on disk' means in reports)."""
    return sum(f.stat().st_size for f in path.iterdir() if f.name.endswith((".safetensors", ".bin")))
