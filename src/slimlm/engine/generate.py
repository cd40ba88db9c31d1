"""Prefill then token-by-token decode with the model's KV cache.

Works with any Hugging Face causal LM (its own forward and cache). The fast parameterised decoder
for the Llama family lives beside this when it lands; this loop is the fallback and the oracle.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from slimlm.engine.sampling import sample_next


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = field(default_factory=tuple)


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


@torch.no_grad()
def generate_ids(
    model: nn.Module, ids: Tensor, params: SamplingParams, on_tokens: Callable[[Tensor], None] | None = None
) -> Tensor:
    """Generate up to max_new_tokens for prompt ids (B, T); returns new tokens (B, n).

    Stops when every sequence has produced a stop id (tokens after a stop are repeats of it).
    `on_tokens` receives each step's tokens (B,) as they are produced, for streaming.
    """
    device = next(model.parameters()).device
    ids = ids.to(device)
    generator = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
    logits, cache = prefill(model, ids)
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
            logits, cache = decode_step(model, tokens, cache)
    return torch.stack(out, 1) if out else ids.new_zeros(ids.shape[0], 0)


def stop_ids_for(tokenizer, model: nn.Module) -> tuple[int, ...]:
    ids: Iterable = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or tokenizer.eos_token_id
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, (list, tuple)) else (int(ids),)


def generate_text(
    model: nn.Module, tokenizer, prompt: str, params: SamplingParams, on_text: Callable[[str], None] | None = None
) -> str:
    """Generate a continuation of `prompt`; `on_text` receives decoded pieces as they stream."""
    enc = tokenizer(prompt, return_tensors="pt")
    ids = enc["input_ids"]
    if ids.numel() == 0:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = torch.tensor([[start]])
    if not params.stop_ids:
        params = SamplingParams(**{**params.__dict__, "stop_ids": stop_ids_for(tokenizer, model)})
    produced: list[int] = []
    emitted = ""

    def stream(tokens: Tensor) -> None:
        nonlocal emitted
        produced.append(int(tokens[0]))
        text = tokenizer.decode(produced, skip_special_tokens=True)
        if on_text and not text.endswith("\ufffd"):  # wait for complete UTF-8 characters
            on_text(text[len(emitted):])
            emitted = text

    generate_ids(model, ids, params, stream)
    text = tokenizer.decode(produced, skip_special_tokens=True)
    if on_text and len(text) > len(emitted):
        on_text(text[len(emitted):])
    return text
