"""The `recover` step: distilling from the model the recipe received wins back KL after structured
pruning, reproduces exactly, and refuses to run where it has no original to learn from."""

import pytest
import torch

import slimlm
from slimlm.eval.perplexity import evaluate_quality
from slimlm.testing import tiny_model, tiny_tokenizer


def _kl(model, reference, ids):
    return evaluate_quality(model, ids, reference=reference).kl


def test_recover_after_channel_pruning_lowers_kl_and_reproduces():
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    ids = torch.randint(0, 320, (2048,))
    prune = dict(method="channels", sparsity=0.5)
    recover = dict(method="recover", steps=100, lr=1e-3, n_samples=32, seq_len=32)
    reference = tiny_model("llama")
    pruned = slimlm.apply(tiny_model("llama"), [prune], tok)
    a = slimlm.apply(tiny_model("llama"), [prune, dict(recover, calib="demo")], tok)
    b = slimlm.apply(tiny_model("llama"), [prune, dict(recover, calib="demo")], tok)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    from slimlm.core.data import load_tokens

    demo = load_tokens("demo", tok)[:1024]
    before, after = _kl(pruned, reference, demo), _kl(a, reference, demo)
    assert after < 0.6 * before, (before, after)
    assert a.slimlm_recipe[-1]["method"] == "recover"
    assert all(p.dtype == torch.float32 for p in a.parameters())


def test_recover_needs_a_recipe_or_hard_labels():
    tok = tiny_tokenizer()
    with pytest.raises(slimlm.SlimError, match="run it as a recipe step"):
        slimlm.prune(tiny_model("llama"), "recover", tokenizer=tok)
    with pytest.raises(slimlm.SlimError, match="steps 0 must be a positive integer"):
        slimlm.RecoverConfig(steps=0)
    from slimlm.distillation.recover import RecoverConfig, recover_

    model = tiny_model("llama")
    with pytest.raises(slimlm.SlimError, match="distills from the model as the recipe received it"):
        recover_(model, RecoverConfig(steps=1), torch.randint(0, 320, (2, 16)))
    recover_(model, RecoverConfig(steps=2, alpha=1.0), torch.randint(0, 320, (2, 16)))  # labels alone: no teacher
