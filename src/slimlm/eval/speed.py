"""Speed: time to first token, prefill and decode throughput, achieved memory bandwidth.

Each figure is the median of `repeats` timed runs after `warmup` untimed ones. Decode is
memory-bound: every step reads all weights once, so achieved bandwidth = bytes of weights read
per step × steps per second; compare it with the machine's memory bandwidth to see the headroom.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from slimlm.core.errors import SlimError
from slimlm.engine.generate import decode_step, prefill
from slimlm.eval.memory import PeakMemory
from slimlm.eval.size import weight_bytes


@dataclass
class BenchSettings:
    prompt_tokens: int = 128
    new_tokens: int = 64
    batch_sizes: tuple[int, ...] = (1, 4)
    repeats: int = 3
    warmup: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.new_tokens < 2:
            raise SlimError("benchmark needs at least 1 prompt token and 2 new tokens; raise --prompt-tokens/--new-tokens")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise SlimError("batch sizes must be positive integers, e.g. --batch-sizes 1,4")
        if self.repeats < 1 or self.warmup < 0:
            raise SlimError("repeats must be at least 1 and warmup at least 0")


@dataclass
class SpeedResult:
    ttft_ms: float  # batch 1: prompt in, first token out
    prefill_tps: float  # batch 1 prompt tokens per second
    decode_tps: dict[int, float] = field(default_factory=dict)  # batch size -> generated tokens/s
    decode_gbps: float = 0.0  # achieved weight-read bandwidth at batch 1
    peak_memory_bytes: int = 0  # peak increase over the loaded model while benchmarking
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["decode_tps"] = {str(k): v for k, v in self.decode_tps.items()}
        return d


def decode_bytes_per_step(model: nn.Module) -> int:
    """Weight bytes one decode step reads: all weights, except an input embedding table that is
    not also the output head (a step reads only B of its rows)."""
    total = weight_bytes(model)
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    emb = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    if emb is not None and (head is None or head.weight.data_ptr() != emb.weight.data_ptr()):
        total -= emb.weight.numel() * emb.weight.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _time_prefill(model: nn.Module, ids: torch.Tensor) -> float:
    device = ids.device
    _sync(device)
    t0 = time.perf_counter()
    logits, _ = prefill(model, ids)
    logits.argmax(-1)
    _sync(device)
    return time.perf_counter() - t0


@torch.no_grad()
def _time_decode(model: nn.Module, ids: torch.Tensor, steps: int) -> float:
    """Seconds for `steps` decode steps after a prefill of ids (B, T) (prefill not timed)."""
    device = ids.device
    logits, cache = prefill(model, ids)
    tokens = logits.argmax(-1)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        logits, cache = decode_step(model, tokens, cache)
        tokens = logits.argmax(-1)
    _sync(device)
    return time.perf_counter() - t0


def measure_speed(model: nn.Module, settings: BenchSettings = BenchSettings(), vocab_size: int | None = None) -> SpeedResult:
    device = next(model.parameters()).device
    vocab = vocab_size or model.config.vocab_size
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 2048)
    if settings.prompt_tokens + settings.new_tokens > limit:
        raise SlimError(
            f"prompt {settings.prompt_tokens} + new {settings.new_tokens} tokens exceed the model's context {limit}; lower them"
        )
    gen = torch.Generator().manual_seed(settings.seed)

    def prompt(batch: int) -> torch.Tensor:
        return torch.randint(0, vocab, (batch, settings.prompt_tokens), generator=gen).to(device)

    steps = settings.new_tokens - 1
    with PeakMemory(device) as mem:
        p1 = prompt(1)
        for _ in range(settings.warmup):
            _time_prefill(model, p1)
        prefill_s = statistics.median(_time_prefill(model, p1) for _ in range(settings.repeats))
        decode_tps = {}
        for batch in settings.batch_sizes:
            ids = prompt(batch)
            for _ in range(settings.warmup):
                _time_decode(model, ids, min(steps, 8))
            seconds = statistics.median(_time_decode(model, ids, steps) for _ in range(settings.repeats))
            decode_tps[batch] = batch * steps / seconds
    first = settings.batch_sizes[0]
    step_rate = decode_tps[first] / first
    return SpeedResult(
        ttft_ms=1000 * prefill_s,
        prefill_tps=settings.prompt_tokens / prefill_s,
        decode_tps=decode_tps,
        decode_gbps=decode_bytes_per_step(model) * step_rate / 1e9,
        peak_memory_bytes=mem.peak_bytes,
        settings=asdict(settings),
    )
