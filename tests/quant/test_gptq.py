import pytest
import torch

import slimlm
from slimlm.core.errors import SlimError
from slimlm.quant import primitives as P
from slimlm.quant.gptq_solver import gptq_quantize
from slimlm.core.hessian import accumulate_hessian
from slimlm.quant.scheme import QuantScheme
from slimlm.testing import tiny_model

SCHEMES = [
    QuantScheme(bits=4, group_size=None, symmetric=True),
    QuantScheme(bits=4, group_size=32, symmetric=False),
    QuantScheme(bits=3, group_size=32, symmetric=False),
    QuantScheme(bits=8, group_size=64, symmetric=True),
]


def correlated_inputs(k: int, m: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    scales = torch.rand(k, generator=g) * 3 + 0.1  # uneven channel magnitudes, as in real activations
    return (torch.randn(m, k, generator=g) @ mix) * scales  # (M, K)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("k", [64, 100])
def test_identity_hessian_equals_round_to_nearest(scheme, act_order, k):
    w = torch.randn(24, k)
    codes, scale, zero = gptq_quantize(w, torch.eye(k), scheme, block_size=32, act_order=act_order)
    rtn_scale, rtn_zero = P.compute_qparams(w, scheme)
    assert torch.equal(scale, rtn_scale) and torch.equal(zero, rtn_zero)
    assert torch.equal(codes, P.quantize(w, rtn_scale, rtn_zero, scheme))


def output_error(w, codes, scale, zero, x):
    w_hat = P.dequantize(codes, scale, zero, w.shape[1])
    return ((x @ w.t() - x @ w_hat.t()) ** 2).sum().item()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("act_order", [False, True])
def test_layer_error_is_no_worse_than_rtn(scheme, act_order):
    torch.manual_seed(1)
    k = 128
    w = torch.randn(32, k)
    x = correlated_inputs(k)
    h, _ = accumulate_hessian(torch.zeros(k, k), 0, x)
    codes, scale, zero = gptq_quantize(w, h, scheme, block_size=64, act_order=act_order)
    rtn_scale, rtn_zero = P.compute_qparams(w, scheme)
    rtn = output_error(w, P.quantize(w, rtn_scale, rtn_zero, scheme), rtn_scale, rtn_zero, x)
    ours = output_error(w, codes, scale, zero, x)
    assert ours <= rtn
    if scheme.bits <= 4:
        assert ours < 0.8 * rtn  # and clearly better at low bit widths


def test_hessian_is_the_running_mean_of_2xxT():
    x1, x2 = torch.randn(3, 5, 8), torch.randn(7, 8)
    h, n = accumulate_hessian(torch.zeros(8, 8), 0, x1)
    h, n = accumulate_hessian(h, n, x2)
    x = torch.cat([x1.reshape(-1, 8), x2])
    assert n == 22
    torch.testing.assert_close(h, 2 * x.t() @ x / 22)


def test_dead_inputs_get_zero_weight():
    k = 64
    x = correlated_inputs(k)
    x[:, 5] = 0
    h, _ = accumulate_hessian(torch.zeros(k, k), 0, x)
    w = torch.randn(16, k)
    codes, scale, zero = gptq_quantize(w, h, QuantScheme(bits=4, group_size=32, symmetric=True))
    assert torch.equal(P.dequantize(codes, scale, zero, k)[:, 5], torch.zeros(16))


def test_gptq_model_beats_rtn_on_the_demo_model():
    model, tok = slimlm.load("demo")
    from slimlm.core.data import load_tokens

    calib = load_tokens("demo@0:20", tok)
    evaluation = load_tokens("demo@20:", tok, max_tokens=3000)
    from slimlm.eval.perplexity import evaluate_quality

    settings = dict(bits=3, group_size=32)
    rtn = slimlm.quantize(slimlm.load("demo")[0], "rtn", **settings)
    gptq = slimlm.quantize(slimlm.load("demo")[0], "gptq", calibration=calib, n_samples=32, seq_len=256, **settings)
    kl_rtn = evaluate_quality(rtn, evaluation, model, max_length=256).kl
    kl_gptq = evaluate_quality(gptq, evaluation, model, max_length=256).kl
    assert kl_gptq < 0.8 * kl_rtn
    assert gptq.slimlm_recipe[-1]["method"] == "gptq" and gptq.slimlm_recipe[-1]["n_samples"] == 32


@pytest.mark.parametrize("family", ["gpt2", "opt", "qwen2"])
def test_gptq_runs_on_other_families_and_saves(family, tmp_path):
    model = tiny_model(family)
    ids = torch.randint(0, 300, (1000,), generator=torch.Generator().manual_seed(0))
    slimlm.quantize(model, "gptq", calibration=ids, bits=4, group_size=32, n_samples=4, seq_len=32, act_order=True)
    slimlm.save(model, tmp_path / "q")
    assert (tmp_path / "q" / "recipe.yaml").read_text().count("act_order: true") == 1


@pytest.mark.parametrize("settings, needle", [({"damp": 0}, "damp"), ({"n_samples": 0}, "n_samples"),
                                              ({"block_size": 0}, "block_size"), ({"bits": 5}, "bits=5")])
def test_gptq_settings_are_checked(settings, needle):
    with pytest.raises(SlimError, match=needle):
        slimlm.quantize(tiny_model("llama"), "gptq", calibration=torch.arange(100), **settings)


def test_gptq_without_data_says_what_to_pass():
    with pytest.raises(SlimError, match="needs calibration data"):
        slimlm.quantize(tiny_model("llama"), "gptq")
