"""Perplexity with a sliding window, and divergence from a reference model, in one pass.

Windows of `max_length` tokens start every `stride` tokens; each token is scored once, in the
first window that reaches it, with as much left context as that window gives (the Hugging Face
"perplexity of fixed-length models" method; stride == max_length is non-overlapping windows).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from slimlm.core.errors import SlimError
from slimlm.core.layers import context_length
from slimlm.eval.metrics import kl_divergence, token_nll, top1_agreement


@dataclass
class QualityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per token, nats
    tokens: int
    kl: float | None = None  # mean KL(P_ref || P) per token, nats
    top1: float | None = None  # fraction of tokens whose argmax matches the reference

    def to_dict(self) -> dict:
        return asdict(self)


def window_spans(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) for each window: score targets at positions first_scored..end-1.

    Positions index the token sequence; the target at position p is predicted from tokens < p, so
    position 0 is never scored.
    """
    spans, scored_until = [], 1
    begin = 0
    while scored_until < n_tokens:
        end = min(begin + max_length, n_tokens)
        spans.append((begin, end, max(scored_until, begin + 1)))
        scored_until = end
        # the next window must start at or before the last scored position so that the next
        # target has context: with stride == max_length consecutive windows share one token
        begin = min(begin + stride, scored_until - 1)
    return spans


def window_length(model: nn.Module, requested: int | None) -> int:
    """The perplexity window: `requested` checked against the model's context, else min(context, 512)."""
    limit = context_length(model) or 2048
    if requested is None:
        return min(limit, 512)
    if requested < 2 or requested > limit:
        raise SlimError(f"window length {requested} must be between 2 and the model's context length {limit}")
    return requested


@torch.no_grad()
def evaluate_quality(
    model: nn.Module,
    ids: Tensor,
    reference: nn.Module | None = None,
    max_length: int | None = None,
    stride: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> QualityResult:
    """Perplexity of `model` on ids (T,), and KL / top-1 agreement against `reference` if given."""
    max_length = window_length(model, max_length)
    stride = stride or max_length
    if not 1 <= stride <= max_length:
        raise SlimError(f"stride {stride} must be between 1 and the window length {max_length}")
    device = next(model.parameters()).device
    spans = window_spans(ids.numel(), max_length, stride)
    nll_sum, kl_sum, agree, count = 0.0, 0.0, 0, 0
    for i, (begin, end, first) in enumerate(spans):
        window = ids[begin:end].to(device)[None]  # (1, L)
        logits = model(window).logits[0, first - begin - 1 : end - begin - 1]  # (S, V) predicting first..end-1
        targets = ids[first:end].to(device)
        nll = token_nll(logits, targets)
        if not torch.isfinite(nll).all():
            raise SlimError("the model produced NaN or infinite logits; the weights or the compression settings are broken")
        nll_sum += nll.sum().item()
        if reference is not None:
            ref_logits = reference(window.to(next(reference.parameters()).device)).logits[0, first - begin - 1 : end - begin - 1]
            ref_logits = ref_logits.to(logits.device)
            kl_sum += kl_divergence(ref_logits, logits).sum().item()
            agree += top1_agreement(ref_logits, logits).sum().item()
        count += targets.numel()
        if on_progress:
            on_progress(i + 1, len(spans))
    mean_nll = nll_sum / count
    return QualityResult(
        perplexity=math.exp(mean_nll),
        nll=mean_nll,
        tokens=count,
        kl=kl_sum / count if reference is not None else None,
        top1=agree / count if reference is not None else None,
    )
