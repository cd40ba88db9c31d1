"""The engine: a model, a preallocated KV cache of `slots` sequences, prefill and batched decode.

Sequences of different lengths decode together: each slot keeps its own length, a decode step
feeds one token per active slot at that slot's own position, and attention masks each row to its
own keys. This is the unit the server's continuous batching schedules (add a sequence to a free
slot with `prefill`, step all active slots with `decode`, `release` finished ones).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimlm.core.errors import SlimError
from slimlm.engine import decoder, fused, graphs
from slimlm.engine.kv_cache import KVCache

KV_DTYPES = ("auto", "int8")


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


class Engine:
    """Runs a Llama-family model on its own decoder (see `decoder.py`); `Engine.supports(model)` says
    whether it can, else callers fall back to the model's forward (`engine.generate`)."""

    def __init__(self, model: nn.Module, slots: int = 1, max_len: int | None = None, kv_dtype: str = "auto",
                 fused_step: bool | None = None, cuda_graphs: bool | None = None) -> None:
        """fused_step: decode with the fused C++ step on CPU (`fused.py`); cuda_graphs: replay decode
        steps of slots 0..B-1 from CUDA graphs (`graphs.py`). None: whenever they can run."""
        spec, reason = decoder.decoder_spec(model)
        if spec is None:
            raise SlimError(f"the engine cannot run this model: {reason}")
        if kv_dtype not in KV_DTYPES:
            raise SlimError(f"kv cache dtype '{kv_dtype}' is not supported; use one of {', '.join(KV_DTYPES)}")
        self.model, self.spec = model, spec
        self.max_len = min(max_len or spec.max_positions, spec.max_positions)
        device = next(model.parameters()).device
        self.cache = KVCache(spec.n_layers, slots, spec.n_kv_heads, self.max_len, spec.head_dim, _float_dtype(model),
                             device, quantized=kv_dtype == "int8")
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # tokens held per slot
        self.device = device
        self.fused, self.fused_reason = fused.fused_plan(model, spec, self.cache) if fused_step is not False else (None, "off")
        if fused_step and self.fused is None:
            raise SlimError(f"the fused decode step cannot run here: {self.fused_reason}")
        can_graph = device.type == "cuda" and not self.cache.quantized
        if cuda_graphs and not can_graph:
            raise SlimError("CUDA graphs need a CUDA device and an unquantized KV cache")
        self.cuda_graphs = can_graph if cuda_graphs is None else cuda_graphs
        self._graphs: dict[int, graphs.GraphedDecode] = {}

    @property
    def decode_ops(self) -> str:
        """Which op set runs decode steps: 'cuda-graphs', 'fused' (the C++ CPU step) or 'torch'."""
        return "cuda-graphs" if self.cuda_graphs else "fused" if self.fused is not None else "torch"

    @staticmethod
    def supports(model: nn.Module) -> bool:
        return decoder.decoder_spec(model)[0] is not None

    def prefill(self, slot: int, ids: Tensor) -> Tensor:
        """Start slot `slot` with prompt ids (T,) (replacing what it held); returns the last logits (V,)."""
        self.release(slot)
        return self.append(slot, ids)

    def append(self, slot: int, ids: Tensor, all_logits: bool = False, read_back: bool = False) -> Tensor:
        """Feed ids (T,) after what slot `slot` holds (chunked prefill); returns the last logits (V,)
        or, with all_logits, (T, V). read_back: attend to the cached keys even for a fresh prompt."""
        ids = ids.reshape(1, -1).to(self.device)
        start = int(self.lengths[slot])
        if ids.shape[1] == 0:
            raise SlimError("the prompt is empty; give at least one token")
        if start + ids.shape[1] >= self.max_len:
            raise SlimError(f"the prompt has {start + ids.shape[1]} tokens; this engine holds {self.max_len} per sequence")
        positions = torch.arange(start, start + ids.shape[1], device=self.device)[None]
        rows = torch.tensor([slot], device=self.device)
        logits = decoder.forward(self.model, self.spec, ids, positions, self.cache, rows, contiguous_rows=slot == 0,
                                 last_only=not all_logits, fresh_prompt_fast_path=not read_back)
        self.lengths[slot] = start + ids.shape[1]
        return logits[0]

    def decode(self, slots: Tensor, tokens: Tensor) -> Tensor:
        """Append one token per slot (tokens (B,) for slots (B,)); returns next-token logits (B, V)."""
        slots, tokens = slots.to(self.device), tokens.to(self.device)
        b = len(slots)
        if self.cuda_graphs and torch.equal(slots, torch.arange(b, device=self.device)):
            if int(self.lengths[:b].max()) >= self.max_len:
                raise SlimError(f"sequence longer than the cache ({self.max_len} tokens); raise max_len")
            if b not in self._graphs:
                self._graphs[b] = graphs.GraphedDecode(self.model, self.spec, self.cache, b)
            logits = self._graphs[b](tokens, self.lengths[:b])
            self.lengths[:b] += 1
            return logits
        if self.fused is not None:
            logits = fused.decode_step(self.model, self.spec, self.fused, tokens, self.lengths[slots], self.cache, slots)
            self.lengths[slots] += 1
            return logits
        positions = self.lengths[slots][:, None]  # (B, 1): each sequence's next position
        contiguous = bool(torch.equal(slots, torch.arange(len(slots), device=self.device)))
        logits = decoder.forward(self.model, self.spec, tokens[:, None], positions, self.cache, slots, contiguous)
        self.lengths[slots] += 1
        return logits

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0
