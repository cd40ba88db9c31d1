"""Prefill then token-by-token decode.

Llama-family models run on the engine (`engine.py`: slimlm's own decoder and preallocated KV
cache); any other Hugging Face causal LM runs on its own forward and cache, which is also the
oracle the engine is tested against.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from slimlm.engine.sampling import SamplingParams, sample_next

__all__ = ["SamplingParams", "generate_ids", "generate_text", "prefill", "decode_step", "stop_ids_for"]


@functools.lru_cache(maxsize=None)
def _forward_args(cls: type) -> tuple[str, bool]:
    """(name of the cache argument, whether `logits_to_keep` is accepted) for a model class.

    transformers 5.x renamed `past_key_values` to `cache`; both spellings are supported.
    """
    params = inspect.signature(cls.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def forward_with_cache(model: nn.Module, ids: Tensor, cache: object | None) -> tuple[Tensor, object]:
    """Run ids (B, T) after `cache`; return last-position logits (B, V) and the updated cache."""
    cache_arg, keep = _forward_args(type(model))
    kwargs = {"use_cache": True}
    if cache is not None:
        kwargs[cache_arg] = cache
    if keep:
        kwargs["logits_to_keep"] = 1  # only the last position's logits are needed
    out = model(ids, **kwargs)
    new_cache = out.cache if hasattr(out, "cache") else out.past_key_values
    return out.logits[:, -1], new_cache


@torch.no_grad()
def prefill(model: nn.Module, ids: Tensor) -> tuple[Tensor, object]:
    """Run the prompt ids (B, T); return last-position logits (B, V) and the KV cache."""
    return forward_with_cache(model, ids, None)


@torch.no_grad()
def decode_step(model: nn.Module, tokens: Tensor, cache: object) -> tuple[Tensor, object]:
    """Feed tokens (B,) at the next position; return logits (B, V) and the updated cache."""
    return forward_with_cache(model, tokens[:, None], cache)


def _steps_on_engine(model: nn.Module, ids: Tensor, max_new_tokens: int, kv_dtype: str):
    """(first logits (B, V), step(tokens) -> logits) on the engine: one slot per row."""
    from slimlm.engine.engine import engine_for

    engine = engine_for(model, slots=ids.shape[0], max_len=ids.shape[1] + max_new_tokens + 1, kv_dtype=kv_dtype)
    logits = torch.stack([engine.prefill(b, ids[b]) for b in range(ids.shape[0])])
    slots = torch.arange(ids.shape[0])
    return logits, lambda tokens: engine.decode(slots, tokens)


def _steps_on_model(model: nn.Module, ids: Tensor):
    """(first logits (B, V), step(tokens) -> logits) on the model's own forward and cache."""
    logits, cache = prefill(model, ids)
    state = {"cache": cache}

    def step(tokens: Tensor) -> Tensor:
        out, state["cache"] = decode_step(model, tokens, state["cache"])
        return out

    return logits, step


@torch.no_grad()
def generate_ids(
    model: nn.Module, ids: Tensor, params: SamplingParams, on_tokens: Callable[[Tensor], None] | None = None,
    engine: bool | None = None, kv_dtype: str = "auto", draft=None, num_speculative: int = 4, spec_stats=None,
) -> Tensor:
    """Generate up to max_new_tokens for prompt ids (B, T); returns new tokens (B, n).

    Stops when every sequence has produced a stop id (tokens after a stop are repeats of it).
    `on_tokens` receives each step's tokens (B,) as they are produced, for streaming.
    engine: run on slimlm's engine (None: whenever it supports the model); kv_dtype 'int8'
    quantizes its KV cache. draft: speculative decoding (`speculative.py`) with 'ngram' (prompt
    lookup), a draft model or its folder proposing `num_speculative` tokens per target step; its
    statistics go into `spec_stats` (a `SpecStats`) when given.
    """
    from slimlm.engine.engine import Engine

    if draft is not None:
        from slimlm.engine import speculative

        tokens, stats = speculative.generate(model, ids, params, draft, num_speculative, on_tokens)
        if spec_stats is not None:
            spec_stats.__dict__.update(stats.__dict__)
        return tokens

    device = next(model.parameters()).device
    ids = ids.to(device)
    generator = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
    if engine is None:
        engine = Engine.supports(model)
    if engine:
        logits, step_fn = _steps_on_engine(model, ids, params.max_new_tokens, kv_dtype)
    else:
        logits, step_fn = _steps_on_model(model, ids)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    stop = torch.tensor(params.stop_ids, dtype=torch.long, device=device)
    out: list[Tensor] = []
    for step in range(params.max_new_tokens):
        tokens = sample_next(logits, params.temperature, params.top_k, params.top_p, generator)  # (B,)
        if out:
            tokens = torch.where(done, out[-1], tokens)
        out.append(tokens)
        if on_tokens:
            on_tokens(tokens)
        if stop.numel():
            done |= torch.isin(tokens, stop)
            if bool(done.all()):
                break
        if step + 1 < params.max_new_tokens:
            logits = step_fn(tokens)
    return torch.stack(out, 1) if out else ids.new_zeros(ids.shape[0], 0)


def stop_ids_for(tokenizer, model: nn.Module) -> tuple[int, ...]:
    ids: Iterable = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or tokenizer.eos_token_id
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, (list, tuple)) else (int(ids),)


def generate_text(
    model: nn.Module, tokenizer, prompt: str, params: SamplingParams, on_text: Callable[[str], None] | None = None,
    **speculative,
) -> str:
    """Generate a continuation of `prompt`; `on_text` receives decoded pieces as they stream."""
    enc = tokenizer(prompt, return_tensors="pt")
    ids = enc["input_ids"]
    if ids.numel() == 0:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = torch.tensor([[start]])
    if not params.stop_ids:
        params = dataclasses.replace(params, stop_ids=stop_ids_for(tokenizer, model))
    produced: list[int] = []
    emitted = ""

    def stream(tokens: Tensor) -> None:
        nonlocal emitted
        produced.append(int(tokens[0]))
        text = tokenizer.decode(produced, skip_special_tokens=True)
        if on_text and not text.endswith("\ufffd"):  # wait for complete UTF-8 characters
            on_text(text[len(emitted):])
            emitted = text

    generate_ids(model, ids, params, stream, **speculative)
    text = tokenizer.decode(produced, skip_special_tokens=True)
    if on_text and len(text) > len(emitted):
        on_text(text[len(emitted):])
    return text
