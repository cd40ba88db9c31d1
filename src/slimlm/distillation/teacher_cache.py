"""Teacher outputs computed once: the top-k logits of every position of every training block
(indices int32 and values float16, k·6 bytes per token), so later epochs skip the teacher's forward.

The soft loss then runs on the teacher's top-k support (as in sparse / top-k knowledge distillation,
e.g. Raman et al., "For Distillation, Tokens Are Not All You Need", and the cached-logits recipes of
MiniLLM-style pipelines): p = softmax(top-k logits / T) renormalised over the k tokens, against the
student's full-vocabulary log-probabilities at those tokens. It pays when the same blocks are seen
for several epochs and the teacher's forward costs a good part of a training step; with one epoch
(or a teacher much smaller than the student's backward) computing it live is as fast.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn


@dataclasses.dataclass
class TopKTeacher:
    indices: Tensor  # (n, T-1, k) int32: the teacher's top-k tokens at each position of each block
    values: Tensor  # (n, T-1, k) float16: their logits

    def lookup(self, blocks: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        """(indices (B·(T-1), k) long, logits (B·(T-1), k) float32) of the given block numbers."""
        idx = self.indices[blocks].to(device).long()
        val = self.values[blocks].to(device).float()
        return idx.reshape(-1, idx.shape[-1]), val.reshape(-1, val.shape[-1])

    def nbytes(self) -> int:
        return self.indices.numel() * self.indices.element_size() + self.values.numel() * self.values.element_size()


@torch.no_grad()
def precompute_topk(teacher: nn.Module, blocks: Tensor, k: int = 64, batch_size: int = 8) -> TopKTeacher:
    """Run the teacher once over blocks (n, T) and keep its top-k logits per next-token position."""
    teacher.eval()
    device = next(teacher.parameters()).device
    indices, values = [], []
    for batch in blocks.split(batch_size):
        logits = teacher(batch.to(device)).logits[:, :-1].float()  # (B, T-1, V)
        top = torch.topk(logits, min(k, logits.shape[-1]), dim=-1)
        indices.append(top.indices.to(torch.int32).cpu())
        values.append(top.values.to(torch.float16).cpu())
    return TopKTeacher(torch.cat(indices), torch.cat(values))


def soft_loss_topk(student_logits: Tensor, teacher_indices: Tensor, teacher_logits: Tensor,
                   temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """T² · KL(p_teacher ‖ p_student) on the teacher's top-k support: student logits (N, V), teacher
    indices and logits (N, k); p_teacher is renormalised over its k tokens."""
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, teacher_indices)  # (N, k)
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (N, k)
    kl = (t.exp() * (t - s)).sum(-1)  # (N,)
    if mask is not None:
        kl = kl[mask]
    return kl.mean() * temperature**2
