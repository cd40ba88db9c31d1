"""The engine: a model, a paged KV cache (`kv_cache.py`), prefill and batched decode.

Sequences of different lengths decode together: each slot keeps its own length, a decode step
feeds one token per active slot at that slot's own position, and attention masks each row to its
own keys. This is the unit the server's continuous batching schedules (add a sequence to a free
slot with `prefill`, step all active slots with `decode`, `release` finished ones).

Every step runs the decoder's one layer loop (`decoder.forward`) with an op set chosen here: the
PyTorch ops for prefill, and for decode the CUDA graph of the static-shape ops, the fused C++ ops
(CPU), or the PyTorch ops, whichever can run. The lengths of the slots and their block tables live on
the host, so the cache's bounds check never reads anything back from the device.

Memory is a pool of blocks of `block_size` tokens: a sequence takes a block when its tokens reach
one, and gives its blocks back when it is released. With prefix caching on, the full blocks of
finished and running sequences are kept by the digest of the tokens up to them, and a new sequence
whose prompt starts with the same tokens starts from them (`reuse_prefix`). A slot is a name; the
cache row of block tables that holds it is the engine's business: the slots holding tokens occupy
rows 0..n-1 (a new sequence takes the first free row; releasing one moves the table in the last
occupied row into its row), so any set of active slots decodes on rows 0..n-1: one bucketed CUDA graph.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimlm.core.errors import SlimError
from slimlm.core.layers import float_dtype, model_device
from slimlm.core.memory import move_to_hugepages
from slimlm.engine import decoder, graphs
from slimlm.engine.fused import FusedOps
from slimlm.engine.kv_cache import DEFAULT_BLOCK_SIZE, BlockPool, CacheFull, KVCache, block_digest
from slimlm.engine.torch_ops import TorchOps

KV_DTYPES = ("auto", "int8")


class Engine:
    """Runs a Llama-family model on its own decoder (see `decoder.py`); `Engine.supports(model)` says
    whether it can, else callers fall back to the model's forward (`engine.generate`).

    The plan (which modules each layer calls, which projections share a kernel call) is made here,
    once: build a new Engine after replacing modules of the model or forcing other kernels."""

    def __init__(self, model: nn.Module, slots: int = 1, max_len: int | None = None, kv_dtype: str = "auto",
                 fused_step: bool | None = None, cuda_graphs: bool | None = None, static_steps: bool = False,
                 spec: decoder.DecoderSpec | None = None, reduce=None, first: bool = True, last: bool = True,
                 block_size: int = DEFAULT_BLOCK_SIZE, kv_tokens: int | None = None,
                 prefix_caching: bool = False) -> None:
        """fused_step: decode with the fused C++ step on CPU (`fused.py`); cuda_graphs: replay decode
        steps from CUDA graphs, one per bucket of batch sizes (`graphs.py`). None: whenever they can run.
        static_steps: run those bucketed fixed-shape steps without capturing them (any device; for tests).
        spec, reduce: for a shard of a model (tensor parallelism): the heads this process holds, and the
        function that sums the row-parallel outputs across processes (`DecoderPlan.reduce`).
        first, last: for a pipeline stage: whether it embeds the tokens (else `append`/`decode` take the
        previous stage's hidden states) and whether it ends in the head (else they return hidden states).
        block_size, kv_tokens: the paged cache's tokens per block and tokens in all (default: every slot
        can hold max_len tokens at once); prefix_caching: keep full blocks' keys and values for later
        requests with the same prompt prefix (`reuse_prefix`)."""
        if spec is None:
            spec, reason = decoder.decoder_spec(model)
            if spec is None:
                raise SlimError(f"the engine cannot run this model: {reason}")
        if kv_dtype not in KV_DTYPES:
            raise SlimError(f"kv cache dtype '{kv_dtype}' is not supported; use one of {', '.join(KV_DTYPES)}")
        for name, value in (("slots", slots), ("block_size", block_size), ("kv_tokens", kv_tokens)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise SlimError(f"the engine's {name} must be an integer >= 1 (got {value!r})")
        self.model, self.spec = model, spec
        self.max_len = min(max_len or spec.max_positions, spec.max_positions)
        self.device = model_device(model)
        self.block_size = block_size
        max_blocks = -(-self.max_len // block_size)
        blocks = slots * max_blocks if kv_tokens is None else -(-kv_tokens // block_size)
        self.cache = KVCache(spec.n_layers, blocks + 1, block_size, spec.n_kv_heads, spec.head_dim, self.max_len,
                             float_dtype(model), self.device, quantized=kv_dtype == "int8")
        self.pool = BlockPool(blocks + 1, prefix_caching)
        self.prefix_caching = prefix_caching
        self.lengths = torch.zeros(slots, dtype=torch.long)  # tokens held per slot, on the host
        self.blocks: list[list[int]] = [[] for _ in range(slots)]  # per slot: its block table
        self.tokens: list[list[int]] = [[] for _ in range(slots)]  # per slot: its token ids (prefix caching)
        self.digests: list[list[bytes]] = [[] for _ in range(slots)]  # per slot: its full blocks' digests
        self._pending: list[tuple[list[int], Tensor]] = []  # decoded tokens not yet in `tokens` (no sync per step)
        self.cached_tokens = 0  # prompt tokens whose keys and values came from the prefix cache
        self.tables = torch.zeros(slots, max_blocks, dtype=torch.long)  # per cache row: its slot's block table
        self.row_of = torch.arange(slots)  # slot -> row; slots holding tokens are in rows 0..n-1
        self.slot_of = torch.arange(slots)  # row -> slot
        self.holding = torch.zeros(slots, dtype=torch.bool)  # slots that own a row (from their first token)
        if self.device.type == "cpu":  # a step reads every weight: from huge pages (`core/memory.py`)
            move_to_hugepages(model)
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

    @property
    def capacity(self) -> int:
        """Tokens the cache holds in all (its blocks, the null block aside)."""
        return (self.cache.blocks - 1) * self.block_size

    def blocks_for(self, slot: int, length: int) -> int:
        """Blocks slot `slot` must be given to hold `length` tokens."""
        return max(0, -(-length // self.block_size) - len(self.blocks[slot]))

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
        returns hidden states (T, C). Raises `CacheFull` (changing nothing) when no blocks are left."""
        ids = ids.reshape(1, -1).to(self.device)
        start, n = int(self.lengths[slot]), ids.shape[1]
        if n == 0:
            raise SlimError("the prompt is empty; give at least one token")
        if start + n >= self.max_len:
            raise SlimError(f"the prompt has {start + n} tokens; this engine holds {self.max_len} per sequence")
        self._reserve({slot: start + n})
        self._take_first_free_row(slot)
        row = int(self.row_of[slot])
        batch = decoder.Batch(ids, torch.arange(start, start + n, device=self.device)[None],
                              self.tables[row:row + 1].to(self.device), last_only=not all_logits,
                              fresh=start == 0 and not read_back,
                              hidden=None if hidden is None else hidden.reshape(1, n, -1).to(self.device))
        logits = decoder.forward(self.plan, self.torch_ops, batch)
        self.lengths[slot] = start + n
        if self.prefix_caching:
            self._pending.append(([slot] * n, ids[0].cpu()))
            self._flush()
        return logits[0]

    def decode(self, slots: Tensor, tokens: Tensor, hidden: Tensor | None = None) -> Tensor:
        """Append one token per slot (tokens (B,) for slots (B,)); returns next-token logits (B, V)
        (a pipeline stage: takes / returns hidden states (B, 1, C) where it does not embed / end).
        Raises `CacheFull` (changing nothing) when the new tokens need more blocks than are left."""
        slots = slots.cpu()
        b, tokens = len(slots), tokens.to(self.device)
        held = self.lengths[slots]  # (B,) each sequence's next position
        self.cache.check_room(int(held.max()) + 1)
        self._reserve(dict(zip(slots.tolist(), (held + 1).tolist())))
        for slot in slots[~self.holding[slots]].tolist():  # a sequence started by a decode step
            self._take_first_free_row(slot)
        rows = self.row_of[slots]
        if self.static_steps and hidden is None:
            occupied = int(self.holding.sum())  # rows 0..occupied-1
            bucket = next(size for size in self.buckets if size >= occupied)
            if bucket not in self._graphs:
                self._graphs[bucket] = graphs.StaticStep(self.plan, self.cache, bucket, graph=self.cuda_graphs)
            logits = self._graphs[bucket](rows, tokens, held, self.tables[:bucket])
        else:
            ops = self.fused if self.fused is not None else self.torch_ops
            batch = decoder.Batch(tokens[:, None], held.to(self.device)[:, None], self.tables[rows].to(self.device),
                                  hidden=None if hidden is None else hidden.reshape(b, 1, -1).to(self.device))
            logits = decoder.forward(self.plan, ops, batch)
        self.lengths[slots] = held + 1
        if self.prefix_caching:
            self._pending.append((slots.tolist(), tokens))  # read on the host when a block fills, not per step
            if len(self._pending) >= 64:
                self._flush()
        return logits

    @property
    def can_mix(self) -> bool:
        """Whether `step` can run: the fused CPU step holds the whole model (embedding to head)."""
        return self.fused is not None and not self.static_steps and self.plan.embed is not None \
            and self.plan.head is not None

    def step(self, slots: list[int], feeds: list[list[int]]) -> Tensor:
        """One forward for several sequences, each fed its own tokens after what it holds: one for a
        sequence that decodes, a chunk of its prompt for one that prefills (the mixed batches of vLLM:
        a new request's short prefill rides along the decode step as a few more rows instead of taking
        a forward of its own). Returns the logits of each sequence's last token (B, V). Rows are tokens
        on the fused step (its kernel writes every row's key and value before any row attends, so a
        sequence's rows see each other causally); `can_mix` says whether it can run. Raises
        `CacheFull` (changing nothing) when the tokens need more blocks than are left."""
        if not self.can_mix:
            raise SlimError(f"mixed steps run on the fused CPU step, not here ({self.decode_ops})")
        counts = [len(f) for f in feeds]
        if not slots or len(slots) != len(feeds) or min(counts) < 1 or len(set(slots)) != len(slots):
            raise SlimError("a mixed step takes distinct slots, each with at least one token")
        index = torch.tensor(slots)
        held, n = self.lengths[index], torch.tensor(counts)
        if int((held + n).max()) >= self.max_len:
            raise SlimError(f"a sequence would reach {int((held + n).max())} tokens; this engine holds {self.max_len}")
        self.cache.check_room(int((held + n).max()))
        self._reserve(dict(zip(slots, (held + n).tolist())))
        for slot in slots:
            self._take_first_free_row(slot)
        owner = torch.repeat_interleave(torch.arange(len(slots)), n)  # row -> its sequence
        positions = torch.cat([torch.arange(h, h + k) for h, k in zip(held.tolist(), counts)])
        ids = torch.tensor([t for f in feeds for t in f])
        batch = decoder.Batch(ids[:, None].to(self.device), positions[:, None].to(self.device),
                              self.tables[self.row_of[index]][owner].to(self.device), pick=n.cumsum(0) - 1)
        logits = decoder.forward(self.plan, self.fused, batch)
        self.lengths[index] = held + n
        if self.prefix_caching:
            self._pending.append(([slots[i] for i in owner.tolist()], ids))
            if max(counts) > 1 or len(self._pending) >= 64:
                self._flush()
        return logits

    def extend(self, slots: Tensor, ids: Tensor) -> Tensor:
        """Feed ids (B, T) after what each of slots (B,) holds, in one forward; returns logits (B, T, V).
        Speculative decoding verifies B sequences' drafts with it (T = 1 + k: the last token and k draft
        tokens); `truncate` then drops each one's rejected tokens."""
        slots = slots.cpu()
        b, t = ids.shape
        held = self.lengths[slots]
        if int(held.max()) + t >= self.max_len:
            raise SlimError(f"a sequence would reach {int(held.max()) + t} tokens; this engine holds {self.max_len}")
        self._reserve(dict(zip(slots.tolist(), (held + t).tolist())))
        for slot in slots[~self.holding[slots]].tolist():
            self._take_first_free_row(slot)
        positions = held[:, None] + torch.arange(t)[None]  # (B, T)
        batch = decoder.Batch(ids.to(self.device), positions.to(self.device),
                              self.tables[self.row_of[slots]].to(self.device), last_only=False)
        logits = decoder.forward(self.plan, self.torch_ops, batch)
        self.lengths[slots] = held + t
        if self.prefix_caching:
            self._pending.append(([s for s in slots.tolist() for _ in range(t)], ids.reshape(-1).cpu()))
            self._flush()
        return logits

    def cached_prefix(self, ids: list[int]) -> list[tuple[int, bytes]]:
        """The cached blocks (block, digest) holding the longest prefix of `ids` in whole blocks, at most
        len(ids) - 1 tokens (nothing is held: see `reuse_prefix`)."""
        if not self.prefix_caching:
            return []
        parent, found = b"", []
        for i in range((len(ids) - 1) // self.block_size):
            parent = block_digest(parent, ids[i * self.block_size:(i + 1) * self.block_size])
            block = self.pool.block_of.get(parent)
            if block is None:
                break
            found.append((block, parent))
        return found

    def cached_length(self, ids: list[int]) -> int:
        """How many leading tokens of `ids` `reuse_prefix` would start from now."""
        return len(self.cached_prefix(ids)) * self.block_size

    def reuse_prefix(self, slot: int, ids: list[int]) -> int:
        """Prefix caching: start the empty slot `slot` with the cached blocks holding the longest prefix of
        prompt `ids` (whole blocks, at most len(ids) - 1 tokens, so the last one is computed for its
        logits); returns how many tokens it holds. Their keys and values are what prefilling them would
        compute (causal attention: a prefix's keys depend on the prefix alone)."""
        self.release(slot)
        found = self.cached_prefix(ids)
        if not found:
            return 0
        n = len(found) * self.block_size
        for block, _ in found:
            self.pool.hold(block)
        self.blocks[slot], self.digests[slot] = [b for b, _ in found], [d for _, d in found]
        self.tokens[slot] = list(ids[:n])
        self._take_first_free_row(slot)
        self.lengths[slot] = n
        self.cached_tokens += n
        return n

    def truncate(self, slot: int, length: int) -> None:
        """Keep the first `length` tokens of `slot` and forget the rest (speculative decoding's rejected
        draft tokens); later tokens overwrite theirs, in a copy of the block if another sequence or the
        prefix cache holds it."""
        self._flush()
        held = int(self.lengths[slot])
        if not 0 <= length <= held:
            raise SlimError(f"cannot keep {length} tokens of a sequence of {held}")
        if length == 0:
            self.release(slot)
            return
        keep, blocks = -(-length // self.block_size), self.blocks[slot]
        if length % self.block_size:
            last = blocks[keep - 1]
            if self.pool.refs[last] > 1:  # shared: copy on write
                if self.pool.available() == 0:
                    raise CacheFull("the KV cache is full")
                copy = self.pool.allocate()
                self.cache.copy(last, copy, length % self.block_size)
                self.pool.drop(last)
                blocks[keep - 1] = copy
            else:  # its cached content is about to change
                self.pool.uncache(last)
        for block in reversed(blocks[keep:]):
            self.pool.drop(block)
        del blocks[keep:]
        del self.digests[slot][length // self.block_size:]
        del self.tokens[slot][length:]
        self.lengths[slot] = length
        self._sync_table(slot)

    def release(self, slot: int) -> None:
        """Free `slot`: its blocks return to the pool (full ones stay cached, the last block first in line
        to be reused), and the sequence in the last occupied row moves into its row (rows stay 0..n-1)."""
        self._flush()
        if self.holding[slot]:
            last = int(self.holding.sum()) - 1
            if int(self.row_of[slot]) != last:
                self._swap_rows(slot, int(self.slot_of[last]))
        for block in reversed(self.blocks[slot]):
            self.pool.drop(block)
        self.blocks[slot], self.tokens[slot], self.digests[slot] = [], [], []
        self.tables[int(self.row_of[slot])].zero_()
        self.lengths[slot] = 0
        self.holding[slot] = False

    def _reserve(self, lengths: dict[int, int]) -> None:
        """Give each slot the blocks to hold its length in `lengths`, all or none (`CacheFull`)."""
        want = sum(self.blocks_for(slot, n) for slot, n in lengths.items())
        if want == 0:
            return
        if want > self.pool.available():
            raise CacheFull(f"the KV cache is full: {want} blocks of {self.block_size} tokens are needed and "
                            f"{self.pool.available()} are free; hold fewer sequences or raise its size (kv_tokens)")
        for slot, n in lengths.items():
            grow = self.blocks_for(slot, n)
            if grow:
                self.blocks[slot].extend(self.pool.allocate() for _ in range(grow))
                self._sync_table(slot)

    def _flush(self) -> None:
        """Record decoded tokens and offer the blocks they filled to the prefix cache."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        touched = set()
        for slots, tokens in pending:
            for slot, token in zip(slots, tokens.tolist()):
                self.tokens[slot].append(token)
                touched.add(slot)
        bs = self.block_size
        for slot in touched:
            tokens, digests, blocks = self.tokens[slot], self.digests[slot], self.blocks[slot]
            for i in range(len(digests), len(tokens) // bs):
                digests.append(block_digest(digests[-1] if digests else b"", tokens[i * bs:(i + 1) * bs]))
                self.pool.register(blocks[i], digests[-1])

    def _sync_table(self, slot: int) -> None:
        table = self.tables[int(self.row_of[slot])]
        table.zero_()
        if self.blocks[slot]:
            table[:len(self.blocks[slot])] = torch.tensor(self.blocks[slot])

    def _take_first_free_row(self, slot: int) -> None:
        """Give the empty `slot` the first free row (rows of the slots holding tokens are 0..n-1)."""
        if self.holding[slot]:
            return
        free = int(self.holding.sum())
        if int(self.row_of[slot]) != free:
            self._swap_rows(slot, int(self.slot_of[free]))
        self.holding[slot] = True
        self._sync_table(slot)

    def _swap_rows(self, a: int, b: int) -> None:
        """Exchange the rows of slots a and b (their block tables move with them; the cache does not)."""
        ra, rb = int(self.row_of[a]), int(self.row_of[b])
        self.row_of[a], self.row_of[b] = rb, ra
        self.slot_of[ra], self.slot_of[rb] = b, a
        self.tables[[ra, rb]] = self.tables[[rb, ra]]


def engine_for(model: nn.Module, slots: int = 1, max_len: int | None = None, kv_dtype: str = "auto", **settings):
    """An engine for `model`: its own, or, for rank 0 of a model spread over processes (tensor or
    pipeline parallel: `model.slimlm_parallel`), one that every process runs its part of."""
    group = getattr(model, "slimlm_parallel", None)
    if group is not None:
        paging = {k: settings[k] for k in ("block_size", "kv_tokens", "prefix_caching") if k in settings}
        return group.engine(slots, max_len, kv_dtype, **paging)
    return Engine(model, slots, max_len, kv_dtype, **settings)
