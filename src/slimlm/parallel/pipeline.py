"""Pipeline parallelism for inference (GPipe, Huang et al., arXiv 1811.06965, applied to decoding):
each rank holds a contiguous run of layers (a stage) with its own KV cache; activations move from
stage to stage with point-to-point sends.

Stages are balanced by parameter bytes (the embedding counts for the first stage, the norm and the
head for the last) or given explicitly. A decode step of B sequences is split into micro-batches
that flow through the stages one after another, so while stage 2 runs micro-batch 1, stage 1 runs
micro-batch 2: with m micro-batches on p stages the pipeline is idle (p - 1) / (m + p - 1) of the time
(the bubble), which each stage measures (`StageRunner.busy`).

Every rank reads only its stage's tensors from the files. Rank 0 (stage 0) drives, as for tensor
parallelism (`driver.py`): each call is broadcast, then every stage runs its part, and the last stage
sends the logits back to rank 0.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from slimlm.core import format as F
from slimlm.core.errors import SlimError
from slimlm.core.files import SafetensorsReader
from slimlm.core.layers import FLOAT_DTYPES, find_blocks, float_dtype, is_compressed, keep_blocks_, replace_module_
from slimlm.core.model_io import (FOREIGN_LAYERS, build_skeleton, check_finite_, load_tokenizer, read_config_json,
                                  resolve_model_path)
from slimlm.engine.decoder import decoder_spec
from slimlm.engine.engine import Engine


def balance(block_bytes: list[int], first_extra: int, last_extra: int, stages: int) -> list[range]:
    """Contiguous runs of blocks, one per stage, minimising the largest stage's bytes (the first stage
    also holds `first_extra` bytes, the last `last_extra`), then the next largest, and so on: a
    linear-partition search over the cuts."""
    n = len(block_bytes)
    if not 1 <= stages <= n:
        raise SlimError(f"--pp {stages} needs at least {stages} layers; the model has {n}")
    prefix = [0]
    for b in block_bytes:
        prefix.append(prefix[-1] + b)

    def cost(a: int, b: int, stage: int) -> int:
        return prefix[b] - prefix[a] + (first_extra if stage == 0 else 0) + (last_extra if stage == stages - 1 else 0)

    best: dict[tuple[int, int], tuple[tuple[int, ...], list[int]]] = {}

    def solve(start: int, stage: int) -> tuple[tuple[int, ...], list[int]]:
        """(stage costs largest first, cut points) for blocks start.. over stages stage.."""
        if stage == stages - 1:
            return (cost(start, n, stage),), []
        key = (start, stage)
        if key not in best:
            options = []
            for cut in range(start + 1, n - (stages - stage - 1) + 1):
                rest, cuts = solve(cut, stage + 1)
                options.append((tuple(sorted((cost(start, cut, stage), *rest), reverse=True)), [cut] + cuts))
            best[key] = min(options)
        return best[key]

    cuts = [0] + solve(0, 0)[1] + [n]
    return [range(a, b) for a, b in zip(cuts, cuts[1:])]


def _tensor_bytes(reader: SafetensorsReader, keys: list[str]) -> int:
    return sum(reader.nbytes(key) for key in keys)


def stage_layout(path: Path, raw: dict, stages: int, dtype=None) -> tuple[nn.Module, list[range]]:
    """(the model's skeleton on meta, the blocks of each stage, balanced by stored bytes)."""
    model = build_skeleton(path, raw, dtype)
    spec, why = decoder_spec(model)
    if spec is None:
        raise SlimError(f"pipeline parallelism runs on slimlm's engine, which cannot run this model: {why}")
    prefix, blocks = find_blocks(model)
    reader = SafetensorsReader(path)
    names = reader.names()
    def under(p: str) -> list[str]:
        return [k for k in names if k.startswith(p) and k not in reader.aliases]

    block_bytes = [_tensor_bytes(reader, under(f"{prefix}.{i}.")) for i in range(len(blocks))]
    embed = _tensor_bytes(reader, under("model.embed_tokens."))
    head = _tensor_bytes(reader, under("lm_head.") + under("model.norm."))
    return model, balance(block_bytes, embed, head, stages)


def check_pp(name_or_path: str | os.PathLike, config) -> None:
    path = resolve_model_path(name_or_path)
    raw = read_config_json(path)
    _check_storage(path, raw)
    stage_layout(path, raw, config.pp)


def _check_storage(path: Path, raw: dict) -> str | None:
    from slimlm.parallel.loading import _check_storage as check

    return check(path, raw)


def load_stage(name_or_path: str | os.PathLike, stages: int, rank: int, dtype=None, device: str = "cpu"):
    """(this stage's model: its blocks, plus the embedding on the first stage and the norm and head on the
    last, only those tensors read; tokenizer; the blocks it holds)."""
    if isinstance(dtype, str):
        dtype = FLOAT_DTYPES[dtype]
    path = resolve_model_path(name_or_path)
    raw = read_config_json(path)
    foreign = _check_storage(path, raw)
    if dtype is None and device == "cpu" and raw.get("dtype", raw.get("torch_dtype")) == "float16":
        dtype = torch.float32
    model, layout = stage_layout(path, raw, stages, dtype)
    held = layout[rank]
    first, last = rank == 0, rank == stages - 1
    prefix, _ = find_blocks(model)
    wanted = [f"{prefix}.{i}." for i in held] + (["model.embed_tokens."] if first else []) + \
        (["model.norm.", "lm_head."] if last else [])
    reader = SafetensorsReader(path)
    names = reader.names()
    if foreign:
        build = FOREIGN_LAYERS.get(foreign)
        compute = dtype or float_dtype(model)
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and name.startswith(tuple(w.rstrip(".") for w in wanted)):
                layer = build(path, name, module, raw[F.QUANTIZATION],
                              lambda key: reader.read(key) if key in names else None, compute)
                if layer is not None:
                    replace_module_(model, name, layer)
    state = {k: reader.read(k) for k, t in model.state_dict(keep_vars=True).items()
             if t.is_meta and k.startswith(tuple(wanted)) and k in names}
    model.load_state_dict(state, strict=False, assign=True)
    head_meta = not is_compressed(model.lm_head) and model.lm_head.weight.is_meta
    if last and head_meta and getattr(model.config, "tie_word_embeddings", False):
        model.lm_head.weight = nn.Parameter(reader.read("model.embed_tokens.weight"), requires_grad=False)
    keep_blocks_(model, list(held))
    missing = [k for k, t in model.state_dict(keep_vars=True).items() if t.is_meta and k.startswith(
        ("model.layers.",) + (("model.embed_tokens.",) if first else ()) + (("model.norm.", "lm_head.") if last else ()))]
    if missing:
        raise SlimError(f"weights in {path} do not match its config (missing {missing[:3]}); the folder is corrupt")
    if dtype is not None:
        model.to(dtype)
    model.eval()
    check_finite_(_Held(model, first, last), path)
    if device != "cpu":
        model.to(device)
    return model, load_tokenizer(path, model.config), held


class _Held(nn.Module):
    """The tensors a stage holds (for the finite check): its blocks and first/last extras."""

    def __init__(self, model: nn.Module, first: bool, last: bool) -> None:
        super().__init__()
        self.layers = model.model.layers
        if first:
            self.embed = model.model.embed_tokens
        if last:
            self.norm, self.head = model.model.norm, model.lm_head


class StageRunner:
    """One stage's engine with the Engine API; every stage runs each call, passing activations on.

    Rank 0 (the first stage) returns the logits the last stage sends back. Decode steps are split into
    `micro_batches` micro-batches that flow through the stages back to back."""

    def __init__(self, engine: Engine, rank: int, stages: int, hidden_size: int, vocab: int, dtype: torch.dtype,
                 micro_batches: int | None = None) -> None:
        self.engine, self.rank, self.stages = engine, rank, stages
        self.hidden_size, self.vocab, self.dtype = hidden_size, vocab, dtype
        self.micro_batches = micro_batches
        self.busy = 0.0  # seconds computing
        self.waiting = 0.0  # seconds waiting for the previous stage (or, on rank 0, for the logits)

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.stages - 1

    # the Engine API
    @property
    def lengths(self) -> Tensor:
        return self.engine.lengths

    @property
    def max_len(self) -> int:
        return self.engine.max_len

    @property
    def decode_ops(self) -> str:
        return self.engine.decode_ops

    def __getattr__(self, name: str):
        """The cache's books (capacity, block_size, pool, blocks_for, ...): every stage keeps the same."""
        if name in ("capacity", "block_size", "pool", "blocks_for", "cached_tokens", "cached_length"):
            return getattr(self.engine, name)
        raise AttributeError(name)

    def release(self, slot: int) -> None:
        self.engine.release(slot)

    def reuse_prefix(self, slot: int, ids: list[int]) -> int:
        return self.engine.reuse_prefix(slot, ids)  # local on every stage: no activations involved

    def truncate(self, slot: int, length: int) -> None:
        self.engine.truncate(slot, length)

    def prefill(self, slot: int, ids: Tensor) -> Tensor:
        self.release(slot)
        return self.append(slot, ids)

    def _recv(self, shape: tuple[int, ...], src: int, dtype: torch.dtype | None = None) -> Tensor:
        import torch.distributed as dist

        t0 = time.perf_counter()
        buffer = torch.empty(shape, dtype=dtype or self.dtype)
        dist.recv(buffer, src)
        self.waiting += time.perf_counter() - t0
        return buffer

    def _run(self, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.busy += time.perf_counter() - t0
        return out

    def append(self, slot: int, ids: Tensor, all_logits: bool = False, read_back: bool = False) -> Tensor:
        import torch.distributed as dist

        n = ids.numel()
        hidden = None if self.first else self._recv((n, self.hidden_size), self.rank - 1)
        out = self._run(self.engine.append, slot, ids, all_logits=all_logits, read_back=read_back, hidden=hidden)
        if not self.last:
            dist.send(out.reshape(n, -1).to(self.dtype).contiguous(), self.rank + 1)
        elif not self.first:
            dist.send(out.float().contiguous(), 0)
        if self.first and not self.last:
            return self._recv((n, self.vocab) if all_logits else (self.vocab,), self.stages - 1, torch.float32)
        return out

    def decode(self, slots: Tensor, tokens: Tensor) -> Tensor:
        import torch.distributed as dist

        slots, tokens = slots.reshape(-1).cpu(), tokens.reshape(-1).cpu()
        b = slots.numel()
        m = min(b, self.micro_batches or self.stages)
        bounds = [(i * b // m, (i + 1) * b // m) for i in range(m)]
        sends = []
        for a, z in bounds:
            hidden = None if self.first else self._recv((z - a, 1, self.hidden_size), self.rank - 1)
            out = self._run(self.engine.decode, slots[a:z], tokens[a:z], hidden=hidden)
            if not self.last:
                sends.append(dist.isend(out.to(self.dtype).contiguous(), self.rank + 1))
            elif not self.first:
                sends.append(dist.isend(out.float().contiguous(), 0))
            else:
                return out  # one stage: nothing to pass on
        logits = None
        if self.first:
            logits = torch.cat([self._recv((z - a, self.vocab), self.stages - 1, torch.float32) for a, z in bounds])
        for handle in sends:
            handle.wait()
        return logits


def pp_factory(path: str, config, rank: int, dtype, device: str):
    """(this stage's model, tokenizer, engine factory) for pipeline parallelism."""
    stages = config.pp
    model, tokenizer, held = load_stage(path, stages, rank, dtype, device)
    first, last = rank == 0, rank == stages - 1
    spec, _ = decoder_spec(model)

    def factory(slots: int, max_len: int | None, kv_dtype: str, **paging):
        engine = Engine(model, slots, max_len, kv_dtype, spec=spec, first=first, last=last, **paging)
        return StageRunner(engine, rank, stages, model.config.hidden_size, model.config.vocab_size,
                           engine.cache.dtype, micro_batches=config.micro_batches or None)

    return model, tokenizer, factory
