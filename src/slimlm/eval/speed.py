"""Speed: time to first token, prefill and decode throughput, achieved memory bandwidth.

Each figure is the median of `repeats` timed runs after `warmup` untimed ones. Decode is
memory-bound: every step reads all weights once, so achieved bandwidth = bytes of weights read
per step × steps per second, reported with its share of the machine's read bandwidth measured in
the same process (`measure_bandwidth`). Llama-family models run on slimlm's engine; `engine=False`
times the model's own forward (transformers), the baseline the engine is compared against.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from dataclasses import field as dataclass_field

import torch
from torch import nn

from slimlm.core.config import Config, field
from slimlm.core.errors import SlimError
from slimlm.core.layers import context_length
from slimlm.engine.engine import Engine, engine_for
from slimlm.engine.generate import decode_step, prefill
from slimlm.eval.memory import PeakMemory
from slimlm.eval.size import weight_bytes


@dataclass(frozen=True)
class BenchSettings(Config):
    name = "bench"
    prompt_tokens: int = field(128, "prompt tokens (time to first token and prefill speed)")
    new_tokens: int = field(64, "tokens generated per decode run")
    batch_sizes: tuple[int, ...] = field((1, 4), "decode batch sizes, e.g. 1,4,8")
    repeats: int = field(3, "timed runs per figure (the median is reported)")
    warmup: int = field(1, "untimed runs first")
    seed: int = field(0, "seed of the random prompts")
    engine: bool | None = field(None, "time slimlm's engine (default: when it supports the model; --no-engine "
                                      "times the model's own forward)")
    kv_dtype: str = field("auto", "engine KV cache storage: auto or int8")

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch_sizes", tuple(self.batch_sizes))
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
    decode_tps: dict[int, float] = dataclass_field(default_factory=dict)  # batch size -> generated tokens/s
    decode_gbps: float = 0.0  # achieved weight-read bandwidth at batch 1
    peak_memory_bytes: int = 0  # peak increase over the loaded model while benchmarking
    runtime: str = "engine"  # "engine" (slimlm) or "transformers" (the model's own forward)
    decode_ops: str = ""  # the engine's decode op set: "fused", "torch" or "cuda-graphs"
    bandwidth_gbps: float = 0.0  # the machine's measured read bandwidth (0: not measured)
    settings: dict = dataclass_field(default_factory=dict)

    @property
    def bandwidth_share(self) -> float:
        """Achieved decode bandwidth as a fraction of the measured machine bandwidth."""
        return self.decode_gbps / self.bandwidth_gbps if self.bandwidth_gbps else 0.0

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
    head_weight = getattr(head, "weight", None)  # None when the head is quantized (never tied then)
    if emb is not None and (head_weight is None or head_weight.data_ptr() != emb.weight.data_ptr()):
        total -= emb.weight.numel() * emb.weight.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Runner:
    """Prefill and decode steps for one batch size, on the engine or on the model's own forward;
    the engine's cache is allocated once, outside the timed regions."""

    def __init__(self, model: nn.Module, batch: int, max_len: int, engine: bool, kv_dtype: str,
                 fused_step: bool | None = None) -> None:
        self.model, self.cache = model, None
        settings = {} if fused_step is None else {"fused_step": fused_step}
        self.engine = engine_for(model, slots=batch, max_len=max_len, kv_dtype=kv_dtype, **settings) if engine else None
        self.slots = torch.arange(batch)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        if self.engine is not None:
            return torch.stack([self.engine.prefill(b, ids[b]) for b in range(ids.shape[0])])
        logits, self.cache = prefill(self.model, ids)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.engine is not None:
            return self.engine.decode(self.slots, tokens)
        logits, self.cache = decode_step(self.model, tokens, self.cache)
        return logits


@torch.no_grad()
def _time_prefill(runner: _Runner, ids: torch.Tensor) -> float:
    device = ids.device
    _sync(device)
    t0 = time.perf_counter()
    runner.prefill(ids).argmax(-1)
    _sync(device)
    return time.perf_counter() - t0


@torch.no_grad()
def _time_decode(runner: _Runner, ids: torch.Tensor, steps: int) -> float:
    """Seconds for `steps` decode steps after a prefill of ids (B, T) (prefill not timed)."""
    device = ids.device
    tokens = runner.prefill(ids).argmax(-1)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        tokens = runner.step(tokens).argmax(-1)
    _sync(device)
    return time.perf_counter() - t0


def _check_batches_fit(model: nn.Module, settings: BenchSettings, max_len: int, device: torch.device) -> None:
    """Refuse, before allocating, batch sizes whose key/value cache and logits the device cannot hold."""
    from slimlm.core.memory import check_fits

    c = model.config
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", 1)
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd", 1)
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", 1)
    kv_width = (getattr(c, "num_key_value_heads", None) or heads) * (getattr(c, "head_dim", None) or hidden // heads)
    per_sequence = 2 * layers * kv_width * max_len * 4 + c.vocab_size * 4 * 2  # fp32 cache (a bound), logits
    batch = max(settings.batch_sizes)
    check_fits(per_sequence * batch, f"benchmarking a batch of {batch} sequences of {max_len} tokens",
               "lower --batch-sizes (or --prompt-tokens / --new-tokens)", device)


def measure_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """The machine's memory read bandwidth in GB/s with torch's current threads: the median time of
    summing a float32 buffer much larger than the caches."""
    x = torch.ones(megabytes * 2**20 // 4)
    x.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times) / 1e9


def measure_speed(model: nn.Module, settings: BenchSettings = BenchSettings(), vocab_size: int | None = None) -> SpeedResult:
    device = next(model.parameters()).device
    vocab = vocab_size or model.config.vocab_size
    limit = context_length(model) or 2048
    if settings.prompt_tokens + settings.new_tokens > limit:
        raise SlimError(
            f"prompt {settings.prompt_tokens} + new {settings.new_tokens} tokens exceed the model's context {limit}; lower them"
        )
    gen = torch.Generator().manual_seed(settings.seed)

    def prompt(batch: int) -> torch.Tensor:
        return torch.randint(0, vocab, (batch, settings.prompt_tokens), generator=gen).to(device)

    steps = settings.new_tokens - 1
    use_engine = Engine.supports(model) if settings.engine is None else settings.engine
    max_len = settings.prompt_tokens + settings.new_tokens + 1

    def runner(batch: int) -> _Runner:
        return _Runner(model, batch, max_len, use_engine, settings.kv_dtype)

    _check_batches_fit(model, settings, max_len, device)

    with PeakMemory(device) as mem:
        p1, r1 = prompt(1), runner(1)
        for _ in range(settings.warmup):
            _time_prefill(r1, p1)
        prefill_s = statistics.median(_time_prefill(r1, p1) for _ in range(settings.repeats))
        decode_tps = {}
        for batch in settings.batch_sizes:
            ids, rb = prompt(batch), runner(batch)
            for _ in range(settings.warmup):
                _time_decode(rb, ids, min(steps, 8))
            seconds = statistics.median(_time_decode(rb, ids, steps) for _ in range(settings.repeats))
            decode_tps[batch] = batch * steps / seconds
    first = settings.batch_sizes[0]
    step_rate = decode_tps[first] / first
    return SpeedResult(
        ttft_ms=1000 * prefill_s,
        prefill_tps=settings.prompt_tokens / prefill_s,
        decode_tps=decode_tps,
        decode_gbps=decode_bytes_per_step(model) * step_rate / 1e9,
        peak_memory_bytes=mem.peak_bytes,
        runtime="engine" if use_engine else "transformers",
        decode_ops=r1.engine.decode_ops if r1.engine is not None else "",
        bandwidth_gbps=measure_bandwidth() if device.type == "cpu" else 0.0,
        settings=asdict(settings),
    )
