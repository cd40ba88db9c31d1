"""`recover`: a recipe step that trains the model briefly to win back what earlier steps cost it,
distilling from the model as the recipe received it (the original).

After structured pruning a short fine-tune recovers much of the loss (LLM-Pruner, Ma et al., arXiv
2305.11627, §3.3; Sheared-LLaMA, Xia et al., arXiv 2310.06694, continue pre-training after
pruning); matching the original's distribution instead of the text's labels (knowledge
distillation, Hinton et al., arXiv 1503.02531) targets exactly the KL the planner measures, so the
default is alpha = 0 (all soft targets, the original as teacher). The loss is
α·L_hard + (1 − α)·T²·KL(teacher ‖ student) (`distillation.losses`), trained by the distillation
trainer on the step's calibration windows with AdamW, linear warm-up and cosine decay; pruned
(exactly zero) weights stay zero. Deterministic for a given recipe and calibration text on one
process, so a recipe with a `recover` step reproduces its model.

    - method: blocks
      sparsity: 0.125
    - method: recover
      steps: 100
    - method: gptq
      bits: 4
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from slimlm.core.calibrate import CalibrationFields
from slimlm.core.config import Config, check, field
from slimlm.core.errors import SlimError
from slimlm.core.steps import Step


@dataclasses.dataclass(frozen=True)
class RecoverConfig(CalibrationFields, Config):
    """Training settings of the recovery (the calibration fields choose its token windows)."""

    name = "recover"
    steps: int = field(100, "optimizer steps")
    lr: float = field(1e-4, "peak learning rate (linear warm-up over a tenth of the steps, then cosine decay)")
    alpha: float = field(0.0, "weight of the true-token loss; 1 - alpha distills from the original (needs no "
                              "teacher when 1)")
    temperature: float = field(1.0, "softmax temperature of the original's soft targets")
    batch_size: int = field(4, "windows per optimizer step")

    def __post_init__(self) -> None:
        CalibrationFields.__post_init__(self)
        check(isinstance(self.steps, int) and not isinstance(self.steps, bool) and self.steps >= 1,
              f"steps {self.steps!r} must be a positive integer")
        check(isinstance(self.lr, (int, float)) and 0 < self.lr < 1, f"lr {self.lr!r} must be in (0, 1), e.g. 1e-4")
        check(isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1, f"alpha {self.alpha!r} must be in [0, 1]")
        check(isinstance(self.temperature, (int, float)) and self.temperature > 0,
              f"temperature {self.temperature!r} must be positive")

    def describe(self) -> str:
        return f"recover {self.steps} steps"


def recover_(model: nn.Module, config: RecoverConfig, samples: Tensor, on_block=None,
             original: nn.Module | None = None) -> nn.Module:
    """Train `model` in place on `samples` (n, T) against `original` (the teacher; None only with alpha 1)."""
    from slimlm.distillation.trainer import TrainConfig, train

    if config.alpha < 1 and original is None:
        raise SlimError("recover distills from the model as the recipe received it; run it as a step of a recipe "
                        "(slimlm.apply or --recipe), or set alpha: 1 to fine-tune on the text alone")
    params = [p for p in model.parameters() if p.is_floating_point()]
    dtypes = [p.dtype for p in params]
    for p in params:  # AdamW on float32 master weights, whatever the model stores
        p.data = p.data.float()
    teacher = original
    if teacher is not None and next(teacher.parameters()).dtype != torch.float32:
        import copy

        teacher = copy.deepcopy(teacher).float()
    train_config = TrainConfig(steps=config.steps, lr=config.lr, warmup_steps=max(1, config.steps // 10),
                               batch_size=min(config.batch_size, samples.shape[0]), seq_len=samples.shape[1],
                               alpha=float(config.alpha), temperature=float(config.temperature), bf16=False,
                               eval_every=config.steps, save_every=config.steps, seed=config.seed)
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(p.is_floating_point())
        train(model, samples, None, train_config, teacher,
              on_step=(lambda step, record: on_block(step, config.steps)) if on_block else None)
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        for p, dtype in zip(params, dtypes):
            p.data = p.data.to(dtype)
    return model


RECOVER = Step(RecoverConfig, recover_, "recover", calibrated=True, needs_original=True,
               summary="train briefly to recover from earlier steps, distilling from the original")
