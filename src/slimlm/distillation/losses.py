"""Distillation losses, pure functions over logits (Hinton et al., "Distilling the Knowledge in a
Neural Network", arXiv 1503.02531).

    L = α · L_hard + (1 − α) · L_soft
    L_hard = cross-entropy of the student with the true next tokens
    L_soft = T² · KL(p_teacher^T ‖ p_student^T)   (softmax at temperature T; T² keeps the gradient
             scale independent of T, as in the paper)

`reverse=True` uses KL(p_student ‖ p_teacher) instead (mode-seeking, as in MiniLLM, arXiv 2306.08543).
Shapes: logits (N, V) over N token positions; labels (N,) with -100 ignored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def hard_loss(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over positions whose label is not -100."""
    return F.cross_entropy(student_logits.float(), labels, ignore_index=-100)


def soft_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, reverse: bool = False,
              mask: Tensor | None = None) -> Tensor:
    """T² · KL between the temperature-softened distributions, averaged over positions (mask (N,) bool
    selects the positions that count)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, V)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (N, V)
    kl = (s.exp() * (s - t)).sum(-1) if reverse else (t.exp() * (t - s)).sum(-1)  # (N,)
    if mask is not None:
        kl = kl[mask]
    return kl.mean() * temperature**2


def distillation_loss(student_logits: Tensor, labels: Tensor, teacher_logits: Tensor | None, alpha: float = 0.5,
                      temperature: float = 2.0, reverse: bool = False) -> tuple[Tensor, dict[str, float]]:
    """α·L_hard + (1−α)·L_soft (L_hard alone without a teacher or at α = 1); returns the loss and its parts."""
    hard = hard_loss(student_logits, labels)
    if teacher_logits is None or alpha >= 1:
        return hard, {"hard": float(hard.detach())}
    soft = soft_loss(student_logits, teacher_logits, temperature, reverse, mask=labels != -100)
    return alpha * hard + (1 - alpha) * soft, {"hard": float(hard.detach()), "soft": float(soft.detach())}


def hidden_loss(student: Tensor, teacher: Tensor, kind: str = "mse", projection: torch.nn.Module | None = None) -> Tensor:
    """Match hidden states (N, C_s) to (N, C_t): MSE, or 1 − cosine similarity; a learned projection
    maps the student's width to the teacher's when they differ."""
    if projection is not None:
        student = projection(student)
    if kind == "mse":
        return F.mse_loss(student.float(), teacher.float())
    if kind == "cosine":
        return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
    raise ValueError(f"hidden loss '{kind}' is not mse or cosine")
