import pytest
import torch

import slimlm
from slimlm.core.calibrate import capture_block_inputs, run_blockwise
from slimlm.core.layers import find_blocks
from slimlm.core.errors import SlimError
from slimlm.core.targeting import select_linear
from slimlm.quant import primitives as P
from slimlm.quant.awq import AWQConfig, AWQStep
from slimlm.quant.awq_math import candidate_scales, scaled_error, search_clip, search_scales
from slimlm.quant.scheme import QuantScheme
from slimlm.quant.smoothing import find_scale_groups, fold_scales_, in_features
from slimlm.testing import FAMILIES, tiny_model, tiny_tokenizer

SCHEME = QuantScheme(bits=4, group_size=32, symmetric=False)


def outlier_inputs(k: int = 64, t: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    x[:, :4] *= 20  # a few salient channels, as in real LLM activations (AWQ §3.1)
    return x


def samples(n=4, t=32, seed=0):
    return torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_exponent_grid_of_zero_reproduces_round_to_nearest(family):
    """Oracle: α ∈ {0} without duo scaling gives s = 1, and without clipping AWQ is exactly RTN."""
    awq_model, rtn_model = tiny_model(family), tiny_model(family)
    slimlm.quantize(awq_model, "awq", calibration=samples(), grid=1, duo_scaling=False, clip=False, bits=4, group_size=32)
    slimlm.quantize(rtn_model, "rtn", bits=4, group_size=32)
    ids = samples(2, 16, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(awq_model(ids).logits, rtn_model(ids).logits, rtol=0, atol=1e-5)


def test_scale_search_is_never_worse_than_rtn_and_helps_with_salient_channels():
    x = outlier_inputs()
    w = torch.randn(48, 64)
    s, err, rtn_err, alpha = search_scales(x, [w], x.abs().mean(0), SCHEME, grid=20, duo=False)
    assert err <= rtn_err and err < 0.9 * rtn_err and alpha is not None and alpha > 0
    assert err == pytest.approx(scaled_error(x, [w], s, SCHEME))
    assert s[:4].mean() > s[4:].mean()  # salient channels are scaled up


def test_candidate_scales_are_normalised():
    s = candidate_scales(torch.rand(16) + 0.1, torch.rand(16) + 0.1, 0.5, duo=True)
    assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(candidate_scales(torch.rand(8), torch.rand(8), 0.0, duo=False), torch.ones(8))


def test_clip_search_never_increases_output_error():
    x, w = outlier_inputs(), torch.randn(40, 64)
    w[0, 3] = 12.0  # an outlier weight stretches its group's range
    scale, zero = search_clip(w, x, SCHEME, grid=10, max_shrink=0.5, chunk_bytes=4096)  # chunked over rows

    def out_err(scale, zero):
        w_hat = P.dequantize(P.quantize(w, scale, zero, SCHEME), scale, zero, 64)
        return ((x @ (w - w_hat).t()) ** 2).mean().item()

    assert out_err(scale, zero) <= out_err(*P.compute_qparams(w, SCHEME))


@pytest.mark.parametrize("family", FAMILIES)
def test_found_folds_preserve_the_block(family):
    """Every group the generic finder returns can absorb any positive scales exactly."""
    model = tiny_model(family)
    prefix, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], samples(2, 16))
    names = [n for n in select_linear(model) if n.startswith(f"{prefix}.0.")]
    groups, orphans = find_scale_groups(blocks[0], f"{prefix}.0.", names, inputs)
    assert groups and sorted(sum((g.layers for g in groups), []) + orphans) == sorted(names)
    args, kwargs = inputs[0]
    with torch.no_grad():
        before = blocks[0](*args, **kwargs)[0]
        for g in groups:
            layers = [model.get_submodule(n) for n in g.layers]
            fold_scales_(model.get_submodule(g.producer), layers, torch.rand(in_features(layers[0])) + 0.5)
        after = blocks[0](*args, **kwargs)[0]
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_known_groups_on_llama_and_opt():
    """Norms feed q/k/v and gate/up; up_proj feeds down_proj; grouped-query v_proj cannot feed o_proj.
    OPT (ReLU, no GQA): v_proj -> out_proj and fc1 -> fc2 are exact."""
    for family, expected, orphan in [
        ("llama", {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"}, ["self_attn.o_proj"]),
        ("opt", {"self_attn_layer_norm", "self_attn.v_proj", "final_layer_norm", "fc1"}, []),
    ]:
        model = tiny_model(family)
        prefix, blocks = find_blocks(model)
        inputs = capture_block_inputs(model, blocks[0], samples(2, 16))
        p = f"{prefix}.0."
        names = [n for n in select_linear(model) if n.startswith(p)]
        groups, orphans = find_scale_groups(blocks[0], p, names, inputs)
        assert {g.producer[len(p):] for g in groups} == expected
        assert [o[len(p):] for o in orphans] == orphan


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_awq_layer_error_on_calibration_inputs_is_no_worse_than_rtn(family):
    model = tiny_model(family)
    step = AWQStep(AWQConfig(bits=3, group_size=32, clip=False))
    run_blockwise(model, samples(), select_linear(model), step)
    assert step.summary and all(g["error"] <= g["rtn_error"] for g in step.summary)
    assert any(g["error"] < g["rtn_error"] for g in step.summary)


def test_awq_model_beats_rtn_on_the_demo_model():
    model, tok = slimlm.load("demo")
    reference = slimlm.load("demo")[0]
    from slimlm.core.data import load_tokens
    from slimlm.eval.perplexity import evaluate_quality

    calib = load_tokens("demo", tok)[:4096]
    evaluation = load_tokens("demo", tok)[-2048:]
    rtn = slimlm.quantize(slimlm.load("demo")[0], "rtn", bits=3, group_size=32)
    slimlm.quantize(model, "awq", calibration=calib, n_samples=8, seq_len=128, bits=3, group_size=32)
    kl_awq = evaluate_quality(model, evaluation, reference, max_length=256).kl
    kl_rtn = evaluate_quality(rtn, evaluation, reference, max_length=256).kl
    assert kl_awq < 0.9 * kl_rtn


def test_awq_saves_and_reloads(tmp_path):
    model = tiny_model("qwen2")
    slimlm.quantize(model, "awq", calibration=samples(), bits=4, group_size=32)
    slimlm.save(model, tmp_path / "m", tiny_tokenizer())
    again, _ = slimlm.load(tmp_path / "m")
    ids = samples(2, 8, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_bad_settings_are_rejected():
    with pytest.raises(SlimError, match="max_shrink"):
        AWQConfig(max_shrink=1.5)
    with pytest.raises(SlimError, match="grid"):
        AWQConfig(grid=0)


def test_scale_only_awq_preserves_the_model_and_then_gptq_quantizes():
    model, reference = tiny_model("llama"), tiny_model("llama")
    calib = samples()
    slimlm.quantize(model, "awq", calibration=calib, quantize=False, bits=3, group_size=32)
    assert not any(isinstance(m, torch.nn.Module) and hasattr(m, "slimlm_kind") for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(calib).logits, reference(calib).logits, rtol=1e-4, atol=1e-4)
    slimlm.quantize(model, "gptq", calibration=calib, bits=3, group_size=32)
    assert any(hasattr(m, "slimlm_kind") for m in model.modules())
