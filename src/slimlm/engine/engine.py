"""The engine: a model, a preallocated KV cache of `slots` sequences, prefill and batched decode.

Sequences of different lengths decode together: each slot keeps its own length, a decode step
feeds one token per active slot at that slot's own position, and attention masks each row to its
own keys. This is the unit the server's continuous batching schedules (add a sequence to a free
slot with `prefill`, step all active slots with `decode`, `release` finished ones).

Every step runs the decoder's one layer loop (`decoder.forward`) with an op set chosen here: the
PyTorch ops for prefill, and for decode the CUDA graph of the static-shape ops, the fused C++ ops
(CPU), or the PyTorch ops, whichever can run. The lengths of the slots live on the host, so the
cache's bounds check never reads anything back from the device.

A slot is a name; the cache row that holds it is the engine's business: the slots holding tokens
occupy rows 0..n-1 (a new sequence takes the first free row; releasing one moves the sequence in the
last occupied row into its row). So any set of active slots decodes on rows 0..n-1 of the cache: one
bucketed CUDA graph, and slices rather than gathers of the cache elsewhere.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimlm.core.errors import SlimError
from slimlm.core.layers import float_dtype, model_device
from slimlm.engine import decoder, graphs
from slimlm.engine.fused import FusedOps
from slimlm.engine.kv_cache import KVCache
from slimlm.engine.torch_ops import TorchOps

KV_DTYPES = ("auto", "int8")


class Engine:
    """Runs a Llama-family model on its own decoder (see `decoder.py`); `Engine.supports(model)` says
    whether it can, else callers fall back to the model's forward (`engine.generate`).

    The plan (which modules each layer calls, which projections share a kernel call) is made here,
    once: build a new Engine after replacing modules of the model or forcing other kernels."""

    def __init__(self, model: nn.Module, slots: int = 1, max_len: int | None = None, kv_dtype: str = "auto",
                 fused_step: bool | None = None, cuda_graphs: bool | None = None, static_steps: bool = False,
                 spec: decoder.DecoderSpec | None = None, reduce=None, first: bool = True, last: bool = True) -> None:
        """fused_step: decode with the fused C++ step on CPU (`fused.py`); cuda_graphs: replay decode
        steps from CUDA graphs, one per bucket of batch sizes (`graphs.py`). None: whenever they can run.
        static_steps: run those bucketed fixed-shape steps without capturing them (any device; for tests).
        spec, reduce: for a shard of a model (tensor parallelism): the heads this process holds, and the
        function that sums the row-parallel outputs across processes (`DecoderPlan.reduce`).
        first, last: for a pipeline stage: whether it embeds the tokens (else `append`/`decode` take the
        previous stage's hidden states) and whether it ends in the head (else they return hidden states)."""
        if spec is None:
            spec, reason = decoder.decoder_spec(model)
            if spec is None:
                raise SlimError(f"the engine cannot run this model: {reason}")
        if kv_dtype not in KV_DTYPES:
            raise SlimError(f"kv cache dtype '{kv_dtype}' is not supported; use one of {', '.join(KV_DTYPES)}")
        if not isinstance(slots, int) or slots < 1:
            raise SlimError(f"the engine needs at least one slot (got {slots!r})")
        self.model, self.spec = model, spec
        self.max_len = min(max_len or spec.max_positions, spec.max_positions)
        self.device = model_device(model)
        self.cache = KVCache(spec.n_layers, slots, spec.n_kv_heads, self.max_len, spec.head_dim, float_dtype(model),
                             self.device, quantized=kv_dtype == "int8")
        self.lengths = torch.zeros(slots, dtype=torch.long)  # tokens held per slot, on the host
        self.row_of = torch.arange(slots)  # slot -> cache row; slots holding tokens are in rows 0..n-1
        self.slot_of = torch.arange(slots)  # cache row -> slot
        self.holding = torch.zeros(slots, dtype=torch.bool)  # slots that own a row (from their first token)
        self.plan = decoder.build_plan(model, spec, first, last)
        if reduce is not None:
            self.plan.reduce = reduce
        self.torch_ops = TorchOps(spec, self.cache)
        self.fused, self.fused_reason = FusedOps.build(self.plan, self.cache) if fused_step is not False else (None, "off")
        if fused_step and self.fused is None:
            raise SlimError(f"the fused decode step cannot run here: {self.fused_reason}")
        can_graph = self.device.type == "cuda" and not self.cache.quantized and first and last
        if cuda_graphs and not can_graph:
            raise SlimError("CUDA graphs need a CUDA device, an unquantized KV cache and the whole model in one process")
        self.cuda_graphs = can_graph if cuda_graphs is None else cuda_graphs
        self.static_steps = self.cuda_graphs or static_steps
        self.buckets = graphs.buckets(slots)
        self._graphs: dict[int, graphs.StaticStep] = {}

    @property
    def decode_ops(self) -> str:
        """Which op set runs decode steps: 'cuda-graphs', 'fused' (the C++ CPU step) or 'torch'."""
        return ("cuda-graphs" if self.cuda_graphs else "static" if self.static_steps else
                "fused" if self.fused is not None else "torch")

    @staticmethod
    def supports(model: nn.Module) -> bool:
        return decoder.decoder_spec(model)[0] is not None

    def prefill(self, slot: int, ids: Tensor) -> Tensor:
        """Start slot `slot` with prompt ids (T,) (replacing what it held); returns the last logits (V,)."""
        self.release(slot)
        return self.append(slot, ids)

    def append(self, slot: int, ids: Tensor, all_logits: bool = False, read_back: bool = False,
               hidden: Tensor | None = None) -> Tensor:
        """Feed ids (T,) after what slot `slot` holds (chunked prefill); returns the last logits (V,)
        or, with all_logits, (T, V). read_back: attend to the cached keys even for a fresh prompt.
        A pipeline stage after the first takes the tokens' hidden states (T, C) too; one before the last
        returns hidden states (T, C)."""
        ids = ids.reshape(1, -1).to(self.device)
        start, n = int(self.lengths[slot]), ids.shape[1]
        if n == 0:
            raise SlimError("the prompt is empty; give at least one token")
        if start + n >= self.max_len:
            raise SlimError(f"the prompt has {start + n} tokens; this engine holds {self.max_len} per sequence")
        self._take_first_free_row(slot)
        row = int(self.row_of[slot])
        batch = decoder.Batch(ids, torch.arange(start, start + n, device=self.device)[None],
                              torch.tensor([row], device=self.device), contiguous=row == 0,
                              last_only=not all_logits, fresh=start == 0 and not read_back,
                              hidden=None if hidden is None else hidden.reshape(1, n, -1).to(self.device))
        logits = decoder.forward(self.plan, self.torch_ops, batch)
        self.lengths[slot] = start + n
        return logits[0]

    def decode(self, slots: Tensor, tokens: Tensor, hidden: Tensor | None = None) -> Tensor:
        """Append one token per slot (tokens (B,) for slots (B,)); returns next-token logits (B, V)
        (a pipeline stage: takes / returns hidden states (B, 1, C) where it does not embed / end)."""
        slots = slots.cpu()
        b, tokens = len(slots), tokens.to(self.device)
        held = self.lengths[slots]  # (B,) each sequence's next position
        for slot in slots[~self.holding[slots]].tolist():  # a sequence started by a decode step
            self._take_first_free_row(slot)
        self.cache.check_room(int(held.max()) + 1)
        rows = self.row_of[slots]
        if self.static_steps and hidden is None:
            occupied = int(self.holding.sum())  # rows 0..occupied-1
            bucket = next(size for size in self.buckets if size >= occupied)
            if bucket not in self._graphs:
                self._graphs[bucket] = graphs.StaticStep(self.plan, self.cache, bucket, graph=self.cuda_graphs)
            logits = self._graphs[bucket](rows, tokens, held)
        else:
            contiguous = bool(torch.equal(rows, torch.arange(b)))
            positions = held.to(self.device)
            ops = self.fused if self.fused is not None else self.torch_ops
            batch = decoder.Batch(tokens[:, None], positions[:, None], rows.to(self.device), contiguous,
                                  hidden=None if hidden is None else hidden.reshape(b, 1, -1).to(self.device))
            logits = decoder.forward(self.plan, ops, batch)
        self.lengths[slots] = held + 1
        return logits

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Start slot `dst` with the first `n` tokens slot `src` holds: their keys and values are copied,
        not computed again (a prompt prefix shared by requests, such as a system prompt)."""
        if src == dst or not 0 < n <= int(self.lengths[src]):
            raise SlimError(f"cannot share {n} tokens of a sequence of {int(self.lengths[src])}")
        self.release(dst)  # may move another sequence's row; rows are read below
        self._take_first_free_row(dst)
        self.cache.move(int(self.row_of[src]), int(self.row_of[dst]), n)
        self.lengths[dst] = n

    def truncate(self, slot: int, length: int) -> None:
        """Keep the first `length` tokens of `slot` and forget the rest (speculative decoding's rejected
        draft tokens); later tokens overwrite theirs in the cache."""
        held = int(self.lengths[slot])
        if not 0 <= length <= held:
            raise SlimError(f"cannot keep {length} tokens of a sequence of {held}")
        if length == 0:
            self.release(slot)
        else:
            self.lengths[slot] = length

    def release(self, slot: int) -> None:
        """Free `slot`; the sequence in the last occupied row moves into its row (rows stay 0..n-1)."""
        if self.holding[slot]:
            last = int(self.holding.sum()) - 1
            row = int(self.row_of[slot])
            if row != last:
                other = int(self.slot_of[last])
                self.cache.move(last, row, int(self.lengths[other]))
                self._swap_rows(slot, other)
        self.lengths[slot] = 0
        self.holding[slot] = False

    def _take_first_free_row(self, slot: int) -> None:
        """Give the empty `slot` the first free row (rows of the slots holding tokens are 0..n-1)."""
        if self.holding[slot]:
            return
        free = int(self.holding.sum())
        if int(self.row_of[slot]) != free:
            self._swap_rows(slot, int(self.slot_of[free]))
        self.holding[slot] = True

    def _swap_rows(self, a: int, b: int) -> None:
        ra, rb = int(self.row_of[a]), int(self.row_of[b])
        self.row_of[a], self.row_of[b] = rb, ra
        self.slot_of[ra], self.slot_of[rb] = b, a


def engine_for(model: nn.Module, slots: int = 1, max_len: int | None = None, kv_dtype: str = "auto", **settings):
    """An engine for `model`: its own, or, for rank 0 of a model spread over processes (tensor or
    pipeline parallel: `model.slimlm_parallel`), one that every process runs its part of."""
    group = getattr(model, "slimlm_parallel", None)
    if group is not None:
        return group.engine(slots, max_len, kv_dtype)
    return Engine(model, slots, max_len, kv_dtype, **settings)
