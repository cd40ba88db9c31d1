import pytest
import torch

import slimlm
from slimlm.core.errors import SlimError
from slimlm.core.layers import replace_module_
from slimlm.core.targeting import select_linear
from slimlm.eval.perplexity import evaluate_quality
from slimlm.quant.smoothquant import SmoothQuantConfig, smoothing_factors
from slimlm.quant.kernels.w8a8 import quantize_rows
from slimlm.quant.w8a8 import W8A8Linear
from slimlm.testing import FAMILIES, tiny_model, tiny_tokenizer


def ids(n=4, t=32, seed=0):
    return torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("m", [1, 3, 8, 9, 17, 64])
@pytest.mark.parametrize("kernel", ["w8a8_int_mm"])
def test_kernels_match_the_reference(m, kernel):
    linear = torch.nn.Linear(72, 40, bias=True)
    layer = W8A8Linear.from_float(linear)
    x = torch.randn(m, 72) * torch.linspace(0.1, 8, 72)
    expected = layer.set_kernel_("reference")(x)
    torch.testing.assert_close(layer.set_kernel_(kernel)(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.set_kernel_(None)(x.view(1, m, 72)), expected.view(1, m, 40), rtol=1e-5, atol=1e-5)


def test_reference_is_exact_w8a8_math():
    """Oracle: the reference kernel equals integer matmul of the codes times both scales."""
    linear = torch.nn.Linear(64, 16, bias=False)
    layer = W8A8Linear.from_float(linear)
    x = torch.randn(5, 64)
    q, sx = quantize_rows(x)
    exact = (q.long() @ layer.qweight.long().t()).double() * sx.double() * layer.scale.double()
    torch.testing.assert_close(layer.set_kernel_("reference")(x).double(), exact, rtol=1e-5, atol=1e-6)


def test_per_token_quantization():
    x = torch.randn(6, 50) * torch.arange(1, 7)[:, None]
    q, s = quantize_rows(x)
    assert q.dtype == torch.int8 and q.abs().amax(-1).eq(127).all()
    assert ((q.float() * s - x).abs() <= s / 2 + 1e-6).all()


def test_smoothing_balances_activation_and_weight_ranges():
    """Eq. 4 with α = 0.5: max|x_j| / s_j = max|W_j| · s_j."""
    xmax, wmax = torch.rand(32) * 50 + 0.1, torch.rand(32) + 0.01
    s = smoothing_factors(xmax, wmax, 0.5)
    torch.testing.assert_close(xmax / s, wmax * s)
    assert torch.equal(smoothing_factors(torch.zeros(3), torch.ones(3), 0.5), torch.ones(3))


def outlier_model(family="llama"):
    """A tiny model whose norm outputs have a few huge channels, like real LLM activations (SmoothQuant §3)."""
    model = tiny_model(family)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("layernorm") or name.endswith("ln_1") or name.endswith("ln_2"):
                module.weight[:3] *= 40
    return model


def test_smoothing_lowers_the_error_of_w8a8_with_activation_outliers():
    reference = outlier_model()
    plain = outlier_model()
    for name, module in select_linear(plain).items():
        replace_module_(plain, name, W8A8Linear.from_float(module))
    smooth = slimlm.quantize(outlier_model(), "smoothquant", calibration=ids(8, 32), alpha=0.5)
    data = ids(1, 256, seed=7)[0]
    kl_plain = evaluate_quality(plain, data, reference, max_length=64).kl
    kl_smooth = evaluate_quality(smooth, data, reference, max_length=64).kl
    assert kl_smooth < 0.5 * kl_plain


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothquant_runs_on_every_family_and_reloads(family, tmp_path):
    model = tiny_model(family)
    reference = tiny_model(family)
    slimlm.quantize(model, "smoothquant", calibration=ids())
    assert all(isinstance(m, W8A8Linear) for m in select_linear(reference).keys() and
               [model.get_submodule(n) for n in select_linear(reference)])
    x = ids(2, 16, seed=1)
    with torch.no_grad():
        out = model(x).logits
        assert (out - reference(x).logits).abs().max() < 0.3
    slimlm.save(model, tmp_path / "m", tiny_tokenizer())
    again, _ = slimlm.load(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, out, rtol=0, atol=0)


def test_bad_alpha_is_rejected():
    with pytest.raises(SlimError, match="alpha"):
        SmoothQuantConfig(alpha=1.5)
