"""Pure per-token quality metrics over logits.

KL divergence and top-1 agreement against a reference model are llama.cpp's measures of what
quantization changed (`llama-perplexity --kl-divergence`): for each position, KL(P_ref || P) and
whether both models rank the same token first.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def token_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Negative log-likelihood (T,) of targets (T,) under logits (T, V)."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def kl_divergence(ref_logits: Tensor, logits: Tensor) -> Tensor:
    """KL(P_ref || P) per position (T,), in nats, from logits (T, V) of both models."""
    ref_logp = F.log_softmax(ref_logits.float(), -1)
    logp = F.log_softmax(logits.float(), -1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp(min=0)


def top1_agreement(ref_logits: Tensor, logits: Tensor) -> Tensor:
    """Whether both models' most likely token agree, per position (T,) bool."""
    return ref_logits.argmax(-1) == logits.argmax(-1)
