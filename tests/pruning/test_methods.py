import pytest
import torch

import slimlm
from slimlm.core.errors import SlimError
from slimlm.pruning import masks as M
from slimlm.pruning.sparsegpt_solver import sparsegpt_prune
from slimlm.core.layers import weight_matrix as layer_weight
from slimlm.pruning.wanda import wanda_scores
from slimlm.testing import tiny_model

FAMILIES = ["llama", "qwen2", "gpt2", "opt", "phi3", "mistral"]
CALIB = torch.randint(1, 300, (4, 32), generator=torch.Generator().manual_seed(0))


def targets(model):
    from slimlm.core.targeting import select_linear

    return select_linear(model)


@pytest.mark.parametrize("method", ["random", "magnitude", "taylor", "wanda", "sparsegpt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_reaches_the_sparsity_and_the_model_still_runs(method, family):
    model = tiny_model(family)
    slimlm.prune(model, method, sparsity=0.5, calibration=CALIB)
    for name, layer in targets(model).items():
        assert abs(M.sparsity(layer_weight(layer)) - 0.5) < 0.02, name
    logits = model(CALIB[:1]).logits
    assert torch.isfinite(logits).all()
    record = model.config.slimlm_sparsity
    assert record["method"] == method and record["sparsity"] == 0.5 and record["targets"]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_two_four_pattern(method):
    model = tiny_model("llama")
    slimlm.prune(model, method, pattern="2:4", calibration=CALIB)
    for layer in targets(model).values():
        assert M.is_nm_sparse(layer_weight(layer), 2, 4)
        assert M.sparsity(layer_weight(layer)) == 0.5


def test_wanda_with_equal_input_norms_is_per_row_magnitude():
    w = torch.randn(8, 32)
    norms = torch.full((32,), 3.0)
    assert torch.equal(M.topk_mask(wanda_scores(w, norms), 0.5, per_row=True),
                       M.topk_mask(w.abs(), 0.5, per_row=True))


def test_sparsegpt_with_identity_hessian_is_magnitude_pruning():
    w = torch.randn(16, 64)
    got = sparsegpt_prune(w, torch.eye(64) * 2, 0.5, block_size=64, damp=1e-9)
    want = M.apply_mask_(w.clone(), M.topk_mask(w.abs(), 0.5))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_layer_error_is_no_worse_than_magnitude(nm):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=gen) * torch.linspace(0.1, 3, 64)  # uneven input scales
    x = x + 0.5 * x[:, torch.randperm(64, generator=gen)]  # correlated inputs
    w = torch.randn(32, 64, generator=gen)
    h = 2 * x.t() @ x / x.shape[0]
    pruned = sparsegpt_prune(w, h, 0.5, nm)
    scores = w.abs()
    magnitude = M.apply_mask_(w.clone(), M.nm_mask(scores, *nm) if nm else M.topk_mask(scores, 0.5))
    err = lambda v: float(((x @ (w - v).t()) ** 2).sum())  # noqa: E731
    assert M.sparsity(pruned) == 0.5
    assert err(pruned) < (0.7 if nm is None else 0.95) * err(magnitude)


def test_wanda_error_is_lower_than_magnitude_with_uneven_inputs():
    """Per layer output error on the calibration inputs: Wanda's input-aware scores beat |W|."""
    from slimlm.pruning.config import PruneConfig
    from slimlm.pruning.wanda import WandaStep

    gen = torch.Generator().manual_seed(1)
    layer = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(256, 64, generator=gen) * torch.linspace(0.05, 4, 64)
    w = layer.weight.data.clone()
    step = WandaStep(PruneConfig(sparsity=0.5))
    step.observe("l", layer, x)
    step.compress("l", layer)
    magnitude = M.apply_mask_(w.clone(), M.topk_mask(w.abs(), 0.5, per_row=True))
    err = lambda v: float(((x @ (w - v).t()) ** 2).sum())  # noqa: E731
    assert err(layer.weight.data) < err(magnitude)


def test_global_scope_spreads_sparsity_unevenly():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(10)  # one layer with much larger weights
    slimlm.prune(model, "magnitude", sparsity=0.5, scope="global")
    down0 = M.sparsity(model.model.layers[0].mlp.down_proj.weight)
    assert down0 < 0.1
    total = sum((layer_weight(m) == 0).sum() for m in targets(model).values())
    size = sum(layer_weight(m).numel() for m in targets(model).values())
    assert abs(float(total) / size - 0.5) < 0.01


def test_bad_settings_are_clear_errors():
    model = tiny_model("llama")
    with pytest.raises(SlimError, match="sparsity 1.2"):
        slimlm.prune(model, "magnitude", sparsity=1.2)
    with pytest.raises(SlimError, match="pattern"):
        slimlm.prune(model, "magnitude", pattern="4:2")
    with pytest.raises(SlimError, match="valid"):
        slimlm.prune(model, "nope")
    with pytest.raises(SlimError, match="calibration"):
        slimlm.prune(model, "wanda")
    with pytest.raises(SlimError, match="divisible by 8"):
        slimlm.prune(tiny_model("llama", intermediate_size=100), "magnitude", pattern="4:8")


def test_pruned_then_gptq_keeps_the_zeros():
    model = tiny_model("llama")
    slimlm.prune(model, "wanda", pattern="2:4", calibration=CALIB)
    slimlm.quantize(model, "gptq", bits=4, group_size=32, calibration=CALIB, n_samples=4)
    for name, layer in model.named_modules():
        if hasattr(layer, "scheme"):
            w = layer.dequantize(torch.float32)
            assert M.is_nm_sparse(w, 2, 4), name


def test_pruned_model_saves_and_reloads(tmp_path):
    model = tiny_model("llama")
    slimlm.prune(model, "magnitude", sparsity=0.5)
    from slimlm.testing.tiny import tiny_tokenizer

    slimlm.save(model, tmp_path / "out", tiny_tokenizer())
    again, _ = slimlm.load(tmp_path / "out")
    assert again.config.slimlm_sparsity["method"] == "magnitude"
    for (name, a), b in zip(targets(model).items(), targets(again).values()):
        assert torch.equal(layer_weight(a), layer_weight(b)), name


def test_a_recipe_prunes_then_quantizes(tmp_path):
    """One flow: 2:4 Wanda, then int4 GPTQ, from a YAML recipe; the pattern survives quantization."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("steps:\n- method: wanda\n  pattern: '2:4'\n  n_samples: 4\n  seq_len: 32\n"
                      "- method: gptq\n  bits: 4\n  group_size: 32\n  n_samples: 4\n  seq_len: 32\n")
    model = tiny_model("llama")
    from slimlm.api import apply as apply_recipe
    from slimlm.testing.tiny import tiny_tokenizer

    apply_recipe(model, recipe, tiny_tokenizer())
    quantized = [m for m in model.modules() if hasattr(m, "scheme")]
    assert quantized and all(M.is_nm_sparse(m.dequantize(torch.float32), 2, 4) for m in quantized)
    assert [step["method"] for step in model.slimlm_recipe] == ["wanda", "gptq"]
