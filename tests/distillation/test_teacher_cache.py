import pytest
import torch

from slimlm.core.errors import SlimError
from slimlm.distillation.losses import soft_loss
from slimlm.distillation.students import layer_subset
from slimlm.distillation.teacher_cache import precompute_topk, soft_loss_topk
from slimlm.distillation.trainer import TrainConfig, train
from slimlm.testing import tiny_model

BLOCKS = torch.randint(1, 300, (16, 33), generator=torch.Generator().manual_seed(0))
CONFIG = dict(steps=8, batch_size=4, seq_len=33, warmup_steps=2, bf16=False, lr=3e-3, alpha=0.3, temperature=2.0)


def test_top_k_over_the_whole_vocabulary_is_the_full_kl():
    s, t = torch.randn(6, 50), torch.randn(6, 50)
    top = torch.topk(t, 50)
    torch.testing.assert_close(soft_loss_topk(s, top.indices, top.values, 2.0), soft_loss(s, t, 2.0))


def test_cached_teacher_trains_like_the_live_one():
    teacher = tiny_model("llama", layers=4, seed=1)
    cache = precompute_topk(teacher, BLOCKS, k=320)  # the whole vocabulary: only float16 rounding differs
    assert cache.indices.shape == (16, 32, 320) and cache.nbytes() == 16 * 32 * 320 * 6
    live, cached = layer_subset(teacher), layer_subset(teacher)
    a = train(live, BLOCKS, None, TrainConfig(**CONFIG), teacher=teacher)
    b = train(cached, BLOCKS, None, TrainConfig(**CONFIG), teacher=cache)
    assert [h["loss"] for h in b] == pytest.approx([h["loss"] for h in a], rel=1e-2)


def test_a_small_top_k_still_pulls_the_student_towards_the_teacher():
    """With a peaked teacher (as trained ones are) its top 16 tokens carry most of the mass."""
    teacher = tiny_model("llama", layers=4, seed=1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(6)
    student = layer_subset(teacher)
    with torch.no_grad():
        kl = lambda: float(torch.nn.functional.kl_div(  # noqa: E731
            student(BLOCKS[:4]).logits.log_softmax(-1), teacher(BLOCKS[:4]).logits.log_softmax(-1), log_target=True,
            reduction="batchmean"))
        start = kl()
    train(student, BLOCKS, None, TrainConfig(**{**CONFIG, "steps": 20, "alpha": 0.0}), teacher=precompute_topk(teacher, BLOCKS, k=16))
    with torch.no_grad():
        assert kl() < 0.8 * start
    with pytest.raises(SlimError, match="other blocks"):
        train(student, BLOCKS[:8], None, TrainConfig(**CONFIG), teacher=precompute_topk(teacher, BLOCKS, k=4))
