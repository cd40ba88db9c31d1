"""Calibration: the settings every calibrated step shares, sampling token windows, and the generic
block-by-block driver for calibrated methods.

The driver (the scheme of GPTQ, arXiv 2210.17323, §4 and its reference code, used by AWQ, SparseGPT,
Wanda): capture the inputs of the first transformer block, then for each block
  1. hook the targeted layers inside it and replay the samples through the block, so the method
     observes each layer's inputs (`observe`),
  2. let the method compress those layers (`compress` returns the replacement module),
  3. replay the samples through the compressed block to get the next block's inputs.
Only one block at a time needs to sit on the compute device, and errors of earlier blocks are seen
by later ones. There is no per-architecture driver: the block list is found from a small table of
known paths, else as the largest `nn.ModuleList` of identical modules.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable, Protocol

import torch
from torch import Tensor, nn

from slimlm.core.config import check, field
from slimlm.core.errors import SlimError
from slimlm.core.layers import block_output, find_blocks, replace_module_
from slimlm.core.memory import check_fits, release_freed_memory


@dataclasses.dataclass(frozen=True)
class CalibrationFields:
    """Where calibration text comes from and how much of it (a mixin of calibrated steps' configs)."""

    calib: str = field("demo", "calibration text: .txt/.jsonl or 'demo'; file.txt@0:500 takes documents 0-499")
    n_samples: int = field(128, "calibration windows")
    seq_len: int = field(512, "tokens per calibration window (capped at the model's context)")
    seed: int = field(0, "seed of the window sampling")
    batch_size: int = field(1, "calibration windows per forward")

    def __post_init__(self) -> None:
        for name in ("n_samples", "seq_len", "batch_size"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                  f"{name} {value!r} must be a positive integer")
        check(isinstance(self.calib, str) and self.calib, "calib must name a .txt/.jsonl file or 'demo'")


def sample_windows(ids: Tensor, n_samples: int, seq_len: int, seed: int = 0) -> Tensor:
    """`n_samples` random windows (n, seq_len) of the token stream ids (T,), reproducible by seed."""
    if n_samples < 1 or seq_len < 2:
        raise SlimError(f"calibration needs n_samples >= 1 and seq_len >= 2 (got {n_samples}, {seq_len})")
    if ids.numel() <= seq_len:
        raise SlimError(
            f"calibration data has {ids.numel()} tokens, fewer than one {seq_len}-token window; "
            "pass more text or a smaller --seq-len"
        )
    distinct = ids.numel() - seq_len
    if n_samples > distinct:
        raise SlimError(f"n_samples {n_samples} asks for more windows than the calibration data has: {ids.numel()} "
                        f"tokens hold {distinct} distinct {seq_len}-token windows; pass more text or a smaller --n-samples")
    rng = random.Random(seed)
    starts = [rng.randrange(0, distinct) for _ in range(n_samples)]
    return torch.stack([ids[s : s + seq_len] for s in starts])


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass after the first block's inputs are seen."""


def capture_block_inputs(model: nn.Module, block: nn.Module, samples: Tensor, batch_size: int = 1) -> list[tuple]:
    """(args, kwargs) the first block receives for each batch of samples (n, T)."""
    captured: list[tuple] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise _Captured

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for start in range(0, samples.shape[0], batch_size):
            try:
                model(samples[start : start + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def replay_observing(block: nn.Module, inputs: list[tuple], observers: dict[nn.Module, Callable[[Tensor], None]]) -> None:
    """Run `block` over every captured input, calling observers[m](x) with the input x of each
    observed module m; the hooks always come off."""
    handles = [m.register_forward_hook(lambda mod, args, out, fn=fn: fn(args[0])) for m, fn in observers.items()]
    try:
        for args, kwargs in inputs:
            block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()


class CalibratedStep(Protocol):
    """What the driver needs from a calibrated method (GPTQ, AWQ, SparseGPT, Wanda, ...).

    A step may also define `begin_block(block, prefix, names, inputs)`, called before the block's
    layers are observed, for work on the whole block (AWQ and SmoothQuant search per-channel scales
    and fold them into the layers there); `inputs` is the list of (args, kwargs) the block receives.
    """

    def observe(self, name: str, module: nn.Module, inputs: Tensor) -> None: ...

    def compress(self, name: str, module: nn.Module) -> nn.Module | None: ...


def sequential_stages(block: nn.Module, names: list[str], modules: dict[str, nn.Module], inputs: list[tuple]) -> list[list[str]]:
    """The layers `names` of a block split into stages in execution order: layers reading the same
    input tensor (q/k/v, gate/up) form one stage. Found by running the block once on the first input."""
    seen: list[tuple[Tensor, list[str]]] = []

    def record(name: str, x: Tensor) -> None:
        for tensor, members in seen:
            if tensor is x:
                if name not in members:
                    members.append(name)
                return
        if not any(name in members for _, members in seen):
            seen.append((x, [name]))

    handles = [modules[n].register_forward_hook(lambda m, a, o, name=n: record(name, a[0])) for n in names]
    try:
        args, kwargs = inputs[0]
        block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    stages = [members for _, members in seen]
    missed = [n for n in names if not any(n in s for s in stages)]
    return stages + ([missed] if missed else [])


@torch.no_grad()
def run_blockwise(
    model: nn.Module,
    samples: Tensor,
    targets: dict[str, nn.Module],
    step: CalibratedStep,
    batch_size: int = 1,
    on_block: Callable[[int, int], None] | None = None,
    sequential: bool = False,
) -> nn.Module:
    """Run a calibrated step over `targets` (name -> module) block by block; modifies the model in place.

    Only the names of `targets` are kept: each block's modules are looked up when the block is
    reached, so a replaced layer's float weights are freed at once (pass the dict as a temporary).

    sequential: inside a block, observe and compress the layers stage by stage in execution order
    (q/k/v, then o, then gate/up, then down), so each stage sees the outputs of the layers already
    compressed before it ("true sequential" in GPTQ's reference code); costs a replay per stage."""
    names = list(targets)
    del targets  # holding the modules would keep every replaced float weight alive until the end
    prefix, blocks = find_blocks(model)
    embed = model.get_input_embeddings().weight
    # the captured block inputs, and the next block's as they are computed
    check_fits(2 * samples.numel() * embed.shape[1] * embed.element_size(),
               f"calibrating on {samples.shape[0]} windows of {samples.shape[1]} tokens",
               "lower --n-samples or --seq-len", embed.device)
    inputs = capture_block_inputs(model, blocks[0], samples, batch_size)
    for index, block in enumerate(blocks):
        block_prefix = f"{prefix}.{index}."
        local = {name: model.get_submodule(name) for name in names if name.startswith(block_prefix)}
        if local:
            begin = getattr(step, "begin_block", None)
            if begin is not None:
                begin(block, block_prefix, list(local), inputs)
            stages = sequential_stages(block, list(local), local, inputs) if sequential else [list(local)]
            for stage in stages:
                replay_observing(block, inputs, {
                    local[name]: (lambda x, name=name, m=local[name]: step.observe(name, m, x)) for name in stage})
                for name in stage:
                    new = step.compress(name, local[name])
                    if new is not None:
                        replace_module_(model, name, new)
                    release_freed_memory()  # the solver's temporaries, the replaced float weights
        inputs = [((block_output(block(*args, **kwargs)),) + tuple(args[1:]), kwargs) for args, kwargs in inputs]
        del local
        release_freed_memory()  # the previous block inputs
        if on_block:
            on_block(index + 1, len(blocks))
    return model
