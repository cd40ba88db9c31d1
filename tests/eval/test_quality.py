import math

import pytest
import torch
import torch.nn.functional as F

import slimlm
from slimlm.core.errors import SlimError
from slimlm.eval.metrics import kl_divergence, top1_agreement
from slimlm.eval.perplexity import evaluate_quality, window_spans
from slimlm.testing import tiny_model


@pytest.mark.parametrize("n, length, stride", [(10, 4, 4), (10, 4, 2), (11, 5, 1), (3, 8, 8), (100, 16, 7)])
def test_every_target_is_scored_exactly_once(n, length, stride):
    scored = []
    for begin, end, first in window_spans(n, length, stride):
        assert end - begin <= length and begin < first <= end
        scored.extend(range(first, end))
    assert scored == list(range(1, n))


def test_perplexity_matches_direct_cross_entropy():
    model = tiny_model("llama")
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(0))
    result = evaluate_quality(model, ids, max_length=40)
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1]
    expected = F.cross_entropy(logits, ids[1:]).item()
    assert result.tokens == 39
    assert math.isclose(result.nll, expected, rel_tol=1e-5)
    assert math.isclose(result.perplexity, math.exp(expected), rel_tol=1e-5)


def test_overlapping_windows_give_more_context_and_no_worse_ppl_on_trained_model():
    model, tok = slimlm.load("demo")
    flat = slimlm.evaluate(model, tok, max_length=32, stride=32, max_tokens=400)
    slide = slimlm.evaluate(model, tok, max_length=32, stride=8, max_tokens=400)
    assert slide.tokens == flat.tokens == 399
    assert slide.perplexity < flat.perplexity


def test_kl_and_top1_against_itself_and_a_quantized_copy():
    ids = torch.randint(0, 300, (64,), generator=torch.Generator().manual_seed(0))
    ref = tiny_model("llama")
    same = evaluate_quality(tiny_model("llama"), ids, reference=ref, max_length=32)
    assert same.kl == pytest.approx(0.0, abs=1e-6) and same.top1 == 1.0
    q = slimlm.quantize(tiny_model("llama"), "rtn", bits=2, group_size=32)
    diff = evaluate_quality(q, ids, reference=ref, max_length=32)
    assert diff.kl > 1e-4 and diff.top1 < 1.0


def test_kl_metric_invariants():
    torch.manual_seed(0)
    a, b = torch.randn(5, 11), torch.randn(5, 11)
    assert torch.allclose(kl_divergence(a, a), torch.zeros(5), atol=1e-6)
    assert (kl_divergence(a, b) > 0).all()
    p, q = a.softmax(-1), b.softmax(-1)
    torch.testing.assert_close(kl_divergence(a, b), (p * (p.log() - q.log())).sum(-1))
    assert top1_agreement(a, a + 1.0).all()


def test_nan_weights_are_reported():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(SlimError, match="NaN"):
        evaluate_quality(model, torch.arange(20), max_length=10)


def test_bad_window_settings():
    model = tiny_model("llama")
    with pytest.raises(SlimError, match="window length"):
        evaluate_quality(model, torch.arange(20), max_length=100_000)
    with pytest.raises(SlimError, match="stride"):
        evaluate_quality(model, torch.arange(20), max_length=10, stride=11)
