import pytest
import torch
import torch.nn.functional as F

from slimlm.distillation.losses import distillation_loss, hard_loss, hidden_loss, soft_loss


def logits(seed, n=6, v=11):
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * 2


def test_kl_of_a_distribution_with_itself_is_zero():
    p = logits(0)
    assert abs(float(soft_loss(p, p, 2.0))) < 1e-6 and abs(float(soft_loss(p, p, 2.0, reverse=True))) < 1e-6


def test_kl_matches_torch_and_scales_with_t_squared():
    s, t = logits(0), logits(1)
    want = F.kl_div(F.log_softmax(s / 3, -1), F.log_softmax(t / 3, -1), log_target=True, reduction="batchmean") * 9
    torch.testing.assert_close(soft_loss(s, t, 3.0), want)
    reverse = F.kl_div(F.log_softmax(t / 3, -1), F.log_softmax(s / 3, -1), log_target=True, reduction="batchmean") * 9
    torch.testing.assert_close(soft_loss(s, t, 3.0, reverse=True), reverse)
    assert float(soft_loss(s, t)) > 0


def test_alpha_one_is_plain_cross_entropy_and_no_teacher_too():
    s, t, labels = logits(0), logits(1), torch.tensor([1, 2, 3, -100, 4, 5])
    want = F.cross_entropy(s, labels, ignore_index=-100)
    torch.testing.assert_close(distillation_loss(s, labels, t, alpha=1.0)[0], want)
    torch.testing.assert_close(distillation_loss(s, labels, None, alpha=0.3)[0], want)
    torch.testing.assert_close(hard_loss(s, labels), want)


def test_combined_loss_and_gradients_are_finite():
    s = logits(0).requires_grad_(True)
    t, labels = logits(1), torch.tensor([1, 2, 3, 0, 4, 5])
    loss, parts = distillation_loss(s, labels, t, alpha=0.25, temperature=2.0)
    torch.testing.assert_close(loss, 0.25 * hard_loss(s, labels) + 0.75 * soft_loss(s, t, 2.0))
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0 and set(parts) == {"hard", "soft"}


def test_hidden_losses_with_a_projection():
    s, t = torch.randn(5, 8), torch.randn(5, 16)
    proj = torch.nn.Linear(8, 16)
    with torch.no_grad():
        assert hidden_loss(s, t, "mse", proj) > 0 and 0 <= float(hidden_loss(s, t, "cosine", proj)) <= 2
    assert float(hidden_loss(t, t, "cosine")) < 1e-6
    with pytest.raises(ValueError):
        hidden_loss(t, t, "l1")
