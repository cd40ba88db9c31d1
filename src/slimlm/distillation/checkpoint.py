"""Training checkpoints that cannot run code when loaded: the tensors in a safetensors file, everything
else (step, history, optimizer and schedule settings) in JSON.

A nested state (dicts, lists, tuples, numbers, strings, tensors: what `state_dict()` of a model,
AdamW and LambdaLR hold) is split into JSON, where each tensor is replaced by a reference to its
entry in the safetensors file, and the tensors themselves. Loading parses JSON and reads safetensors
only: there is no pickle anywhere (`torch.load` on a crafted file runs arbitrary code).

Layout: `OUT/checkpoint/state.json` and `OUT/checkpoint/tensors.safetensors`, written into
`checkpoint.tmp` and renamed into place, so a crash mid-save leaves the previous checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from slimlm.core.errors import SlimError
from slimlm.core.files import first_line

FOLDER = "checkpoint"
STATE = "state.json"
TENSORS = "tensors.safetensors"
VERSION = 1
LEGACY = "checkpoint.pt"  # the pickled format of earlier releases, refused


def _split(value: Any, tensors: dict[str, Tensor], where: str, seen: dict | None = None) -> Any:
    """JSON-able form of `value`, tensors moved into `tensors` (a tensor that is another's view, as
    tied weights are, is stored once and referenced twice)."""
    seen = {} if seen is None else seen
    if isinstance(value, Tensor):
        identity = (value.device, value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
        if value.numel() and identity in seen:
            return {"__tensor__": seen[identity]}
        key = seen[identity] = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) for k in value):
            raise TypeError(f"checkpoint: keys of {where} must be strings or integers")
        return {"__dict__": [[k, _split(v, tensors, f"{where}.{k}", seen)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_split(v, tensors, f"{where}[{i}]", seen) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_split(v, tensors, f"{where}[{i}]", seen) for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint: {where} holds a {type(value).__name__}, which a checkpoint cannot store")


def _join(value: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value:
            return tuple(_join(v, tensors) for v in value["__tuple__"])
        if "__float__" in value:
            return float(value["__float__"])
        return {k: _join(v, tensors) for k, v in value["__dict__"]}
    return value


def save_checkpoint(out: Path, state: dict[str, Any]) -> None:
    """Write `state` (nested dicts/lists/tuples of numbers, strings and tensors) as OUT/checkpoint."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    document = {"version": VERSION, "state": _split(state, tensors, "state")}
    out.mkdir(parents=True, exist_ok=True)
    tmp, final = out / (FOLDER + ".tmp"), out / FOLDER
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(tensors, tmp / TENSORS)
    (tmp / STATE).write_text(json.dumps(document))
    old = out / (FOLDER + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def has_checkpoint(out: Path | None) -> bool:
    return out is not None and ((out / FOLDER / STATE).is_file() or (out / LEGACY).is_file())


def load_checkpoint(out: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The state saved by `save_checkpoint`; a pickled checkpoint of an earlier release, a corrupt or a
    newer one is refused with a clear message (nothing in it is executed)."""
    from safetensors.torch import load_file

    folder = out / FOLDER
    if not (folder / STATE).is_file() and (out / LEGACY).is_file():
        raise SlimError(f"{out / LEGACY} is a pickled checkpoint of an earlier slimlm, which is not loaded (a pickle "
                        "can run code); start again without --resume")
    try:
        document = json.loads((folder / STATE).read_text())
        tensors = load_file(folder / TENSORS, device=str(device))
    except Exception as e:  # OSError, JSONDecodeError, SafetensorError: unreadable or truncated
        raise SlimError(f"the checkpoint in {folder} is corrupt ({first_line(e)}); delete it and start again "
                        "without --resume") from None
    if not isinstance(document, dict) or not isinstance(document.get("version"), int):
        raise SlimError(f"the checkpoint in {folder} is corrupt (no version); delete it and start again without --resume")
    if document["version"] > VERSION:
        raise SlimError(f"the checkpoint in {folder} was written by a newer slimlm (version {document['version']}); "
                        "upgrade slimlm to resume it")
    try:
        return _join(document["state"], tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise SlimError(f"the checkpoint in {folder} is corrupt ({first_line(e)}); delete it and start again "
                        "without --resume") from None
