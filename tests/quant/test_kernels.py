import pytest
import torch
from torch import nn

from slimlm.core.errors import SlimError
from slimlm.quant.kernels import choose_kernel, kernel_names
from slimlm.quant.kernels.cpu_avx512 import extension
from slimlm.quant.linear import QuantizedLinear
from slimlm.quant.scheme import QuantScheme


def make_layer(n, k, scheme, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    return QuantizedLinear.from_float(lin, scheme)


def run_with(layer, name, x):
    layer.set_kernel_(name)
    return layer(x)


AVX512 = extension() is not None  # compiled once per machine (about 20 s), then cached by torch
FAST_CASES = [
    ("cpu_int8", QuantScheme(bits=8, group_size=None, symmetric=True)),
    ("cpu_int8", QuantScheme(bits=8, group_size=None, symmetric=False)),
    ("cpu_int4", QuantScheme(bits=4, group_size=32, symmetric=False)),
    ("cpu_int4", QuantScheme(bits=4, group_size=64, symmetric=True)),
    ("cpu_int4", QuantScheme(bits=4, group_size=128, symmetric=False, scale_dtype="bfloat16")),
] + ([
    ("cpu_int4_avx512", QuantScheme(bits=4, group_size=32, symmetric=False)),
    ("cpu_int4_avx512", QuantScheme(bits=4, group_size=128, symmetric=True)),
    ("cpu_int8_avx512", QuantScheme(bits=8, group_size=None, symmetric=True)),
    ("cpu_int8_avx512", QuantScheme(bits=8, group_size=None, symmetric=False)),
    ("cpu_int8_a16", QuantScheme(bits=8, group_size=None, symmetric=True)),
    ("cpu_int8_a16", QuantScheme(bits=8, group_size=None, symmetric=False)),
] if AVX512 else [])
INT8_ACTIVATION_CASES = [
    ("cpu_int4_a8", QuantScheme(bits=4, group_size=32, symmetric=False)),
    ("cpu_int4_a8", QuantScheme(bits=4, group_size=128, symmetric=True)),
    ("cpu_int8_a8", QuantScheme(bits=8, group_size=None, symmetric=True)),
    ("cpu_int8_a8", QuantScheme(bits=8, group_size=None, symmetric=False)),
]


def assert_bf16_close(fast, ref):
    """Fast CPU kernels compute in bfloat16: allow bf16 rounding (2^-8 relative) of the largest output."""
    assert fast.shape == ref.shape and fast.dtype == ref.dtype
    assert (fast.float() - ref.float()).abs().max() <= 1e-2 * ref.float().abs().max()


@pytest.mark.parametrize("kernel, scheme", FAST_CASES)
@pytest.mark.parametrize("m", [1, 5])
def test_fast_kernels_match_reference_fp32(kernel, scheme, m):
    layer = make_layer(48, 256, scheme)
    x = torch.randn(m, 3, 256)
    ref = run_with(layer, "reference", x.bfloat16().float())
    fast = run_with(layer, kernel, x)
    assert layer.kernel == kernel
    assert_bf16_close(fast, ref)


@pytest.mark.parametrize("kernel, scheme", FAST_CASES)
def test_fast_kernels_match_reference_bf16(kernel, scheme):
    layer = make_layer(32, 128, scheme).to(torch.bfloat16)
    x = torch.randn(4, 128).to(torch.bfloat16)
    ref = run_with(layer, "reference", x)
    fast = run_with(layer, kernel, x)
    assert fast.dtype == torch.bfloat16
    assert_bf16_close(fast, ref)


@pytest.mark.skipif(not AVX512, reason="needs a C++ compiler and an AVX-512 VNNI/BF16 CPU")
@pytest.mark.parametrize("kernel, scheme", INT8_ACTIVATION_CASES)
@pytest.mark.parametrize("m", [1, 3, 8, 16])
def test_int8_activation_kernels_stay_within_activation_rounding(kernel, scheme, m):
    """int8 activations per 32 columns add about 0.5% of the output scale (more with outlier channels)."""
    layer = make_layer(64, 256, scheme)
    x = torch.randn(m, 256)
    ref = run_with(layer, "reference", x)
    fast = run_with(layer, kernel, x)
    assert layer.kernel == kernel and (fast - ref).abs().max() <= 3e-2 * ref.abs().max()


def test_reference_kernel_is_dequantize_matmul():
    layer = make_layer(24, 40, QuantScheme(bits=3, group_size=32))
    x = torch.randn(2, 40)
    expected = x @ layer.dequantize().t() + layer.bias
    torch.testing.assert_close(run_with(layer, "reference", x), expected)


def test_automatic_choice_and_fallback():
    int4 = make_layer(32, 64, QuantScheme(bits=4, group_size=32))
    assert choose_kernel(int4, torch.device("cpu")).name == ("cpu_int4_a8" if AVX512 else "cpu_int4")
    int4_g64 = make_layer(32, 64, QuantScheme(bits=4, group_size=64))  # the bf16 AVX-512 kernel has g32/g128 only
    assert choose_kernel(int4_g64, torch.device("cpu")).name == ("cpu_int4_a8" if AVX512 else "cpu_int4")
    odd = make_layer(24, 64, QuantScheme(bits=4, group_size=32))  # N % 16 != 0: only the portable kernel
    assert choose_kernel(odd, torch.device("cpu")).name == ("cpu_int4_a8" if AVX512 else "reference")
    bf16_scales = make_layer(32, 64, QuantScheme(bits=4, group_size=32, scale_dtype="bfloat16"))
    assert choose_kernel(bf16_scales, torch.device("cpu")).name == "cpu_int4"
    padded = make_layer(32, 100, QuantScheme(bits=4, group_size=32))  # group does not divide K
    assert choose_kernel(padded, torch.device("cpu")).name == "reference"
    grouped8 = make_layer(32, 64, QuantScheme(bits=8, group_size=32))
    assert choose_kernel(grouped8, torch.device("cpu")).name == "reference"
    int3 = make_layer(32, 64, QuantScheme(bits=3, group_size=32))
    assert choose_kernel(int3, torch.device("cpu")).name == "reference"


def test_forcing_an_unsupported_kernel_is_a_clear_error():
    layer = make_layer(24, 64, QuantScheme(bits=4, group_size=32))
    with pytest.raises(SlimError, match="cannot run"):
        run_with(layer, "cpu_int4", torch.randn(1, 64))
    with pytest.raises(SlimError, match="valid: "):
        run_with(layer, "nope", torch.randn(1, 64))


def test_registry_lists_builtin_kernels():
    assert {"reference", "cpu_int8", "cpu_int4"} <= set(kernel_names())


def test_to_keeps_scale_precision_and_rebuilds_kernel_state():
    layer = make_layer(32, 64, QuantScheme(bits=4, group_size=32))
    x = torch.randn(2, 64)
    layer(x)
    scale = layer.scale.clone()
    layer.to(torch.bfloat16)
    assert layer.scale.dtype == torch.float16 and torch.equal(layer.scale, scale)
    assert layer.compute_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert layer(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("kernel, scheme", FAST_CASES)
def test_many_rows_take_the_dense_path_and_still_match(kernel, scheme):
    layer = make_layer(32, 256, scheme)
    x = torch.randn(200, 256)  # above dense_rows: dequantize + GEMM
    from slimlm.quant.kernels import get_kernel

    assert x.shape[0] >= get_kernel(kernel).dense_rows
    assert_bf16_close(run_with(layer, kernel, x), run_with(layer, "reference", x.bfloat16().float()))


def test_int8_kernel_survives_unaligned_weights():
    """Safetensors mmap gives weights at arbitrary offsets; ATen's bf16 int8 op segfaulted on them."""
    layer = make_layer(64, 256, QuantScheme(bits=8, group_size=None, symmetric=True))
    storage = torch.empty(layer.qweight.numel() + 1, dtype=torch.int8)
    unaligned = storage[1:].view_as(layer.qweight)
    unaligned.copy_(layer.qweight)
    layer.qweight = unaligned
    x = torch.randn(20, 256)
    expected = run_with(layer, "reference", x.bfloat16().float())
    assert_bf16_close(run_with(layer, "cpu_int8", x), expected)


@pytest.mark.parametrize("n, k", [(16, 32), (24, 64), (172, 64), (64, 172), (64, 40), (48, 100), (32, 256)])
@pytest.mark.parametrize("scheme", [s for _, s in FAST_CASES] + [QuantScheme(bits=3, group_size=32)])
@pytest.mark.parametrize("m", [1, 4, 17])
def test_automatic_kernel_matches_reference_on_awkward_shapes(n, k, scheme, m):
    """Whatever kernel is picked for a shape, it must agree with the oracle (odd shapes fall back)."""
    layer = make_layer(n, k, scheme)
    x = torch.randn(m, k)
    expected = run_with(layer, "reference", x.bfloat16().float())
    assert_bf16_close(run_with(layer, None, x), expected)


@pytest.mark.skipif(not AVX512, reason="needs a C++ compiler and an AVX-512 VNNI/BF16 CPU")
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_run_many_equals_one_call_per_layer(group, dtype):
    """q/k/v-style: several weights against one input in one call give each layer's own output."""
    from slimlm.engine.decoder import KernelProjection, projection

    scheme = QuantScheme(bits=4, group_size=group)
    layers = [make_layer(n, 256, scheme, seed=i).to(dtype) for i, n in enumerate((64, 16, 48))]
    x = torch.randn(3, 256).to(dtype)
    grouped = projection(layers, x[:1])
    assert isinstance(grouped, KernelProjection)  # the engine decides once to run them together
    together = grouped(x)
    assert all(layer.kernel == "cpu_int4_a8" for layer in layers)
    for layer, y in zip(layers, together):
        assert torch.equal(y, layer(x))


@pytest.mark.skipif(not AVX512, reason="needs a C++ compiler and an AVX-512 VNNI/BF16 CPU")
def test_run_many_falls_back_for_mixed_group_sizes():
    from slimlm.engine.decoder import projection

    layers = [make_layer(32, 256, QuantScheme(bits=4, group_size=g), seed=g) for g in (32, 128)]
    x = torch.randn(2, 256)
    for layer, y in zip(layers, projection(layers, x[:1])(x)):
        assert torch.equal(y, layer(x))


@pytest.mark.skipif(not AVX512, reason="needs a C++ compiler and an AVX-512 VNNI/BF16 CPU")
@pytest.mark.parametrize("k, group", [(256, 32), (256, 128), (128, None)])  # None: per-channel, one group of 128
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("name", ["cpu_int4_avx512", "cpu_int4_a8"])
def test_prefill_dequantization_is_the_reference_weight_rounded_once(k, group, symmetric, name):
    """Every int4 layout the AVX-512 kernel runs dequantizes for prefill to exactly the reference weight
    in bfloat16. (Group 64 is not one: such layers get another kernel, see test_automatic_choice_and_fallback.)"""
    from slimlm.quant.kernels import get_kernel

    layer = make_layer(48, k, QuantScheme(bits=4, group_size=group, symmetric=symmetric))
    kernel = get_kernel(name)
    assert kernel.supports(layer, torch.device("cpu"))  # a layout it declined would test nothing
    dense = kernel.dense_weight(layer, kernel.prepare(layer, torch.float32))
    assert torch.equal(dense, layer.dequantize(torch.float32).bfloat16())


@pytest.mark.skipif(not AVX512, reason="needs a C++ compiler and an AVX-512 VNNI/BF16 CPU")
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("name", ["cpu_int8_avx512", "cpu_int8_a16"])
def test_int8_prefill_dequantization_is_the_reference_weight_rounded_once(symmetric, name):
    from slimlm.quant.kernels import get_kernel

    layer = make_layer(48, 256, QuantScheme(bits=8, group_size=None, symmetric=symmetric))
    kernel = get_kernel(name)
    dense = kernel.dense_weight(layer, kernel.prepare(layer, torch.float32))
    assert torch.equal(dense, layer.dequantize(torch.float32).bfloat16())


def int8_activation_oracle(layer, x):
    """What the int8-activation kernels compute, in float64: x rounded to int8 per 32 columns (scale
    amax/127, round half to even) times the exact dequantized weight."""
    xb = x.double().reshape(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    xq = torch.where(amax > 0, torch.round(xb * (127 / amax)), torch.zeros_like(xb)) * (amax / 127)
    return xq.reshape(x.shape) @ layer.dequantize(torch.float32).double().t() + (
        layer.bias.double() if layer.bias is not None else 0)


@pytest.mark.skipif(not AVX512, reason="needs a C++ compiler and an AVX-512 VNNI/BF16 CPU")
@pytest.mark.parametrize("n, k, group", [(48, 256, 32), (40, 640, 128), (16, 2048, 64), (24, 160, 32), (32, 512, 256)])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("m", [1, 3, 9])
def test_int4_a8_is_exactly_int8_activations_times_the_codes(n, k, group, symmetric, m):
    """The default int4 decode kernel against its own arithmetic done in float64: only float32 rounding
    differs. Shapes cover a partial last 128-column chunk (K = 160), N not a multiple of 16, every group
    size, more than 8 rows (two passes) and K >= 640, where GCC 12 -O3 once vectorized the activation
    preparation wrongly."""
    layer = make_layer(n, k, QuantScheme(bits=4, group_size=group, symmetric=symmetric))
    x = torch.randn(m, k)
    got = run_with(layer, "cpu_int4_a8", x)
    want = int8_activation_oracle(layer, x)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


def int16_activation_oracle(layer, x):
    """What cpu_int8_a16 computes, in float64: x rounded to int16 per 256 columns (scale amax/32767, round
    half to even) times the exact dequantized weight."""
    m, k = x.shape
    pad = -k % 256
    xb = torch.nn.functional.pad(x.double(), (0, pad)).reshape(m, -1, 256)
    amax = xb.abs().amax(-1, keepdim=True)
    xq = torch.where(amax > 0, torch.round(xb * (32767 / amax)), torch.zeros_like(xb)) * (amax / 32767)
    return xq.reshape(m, -1)[:, :k] @ layer.dequantize(torch.float32).double().t() + (
        layer.bias.double() if layer.bias is not None else 0)


@pytest.mark.skipif(not AVX512, reason="needs a C++ compiler and an AVX-512 VNNI/BF16 CPU")
@pytest.mark.parametrize("n, k", [(48, 256), (40, 640), (17, 2048), (24, 160), (32, 96), (8, 5632)])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("m", [1, 3, 9])
def test_int8_a16_is_exactly_int16_activations_times_the_codes(n, k, symmetric, m):
    """The default int8 decode kernel against its own arithmetic in float64: only float32 rounding
    differs. Shapes cover partial 256-column blocks (K = 160, 640, 96: an odd 32-column chunk at the
    end), N not a multiple of 16, K = 5632 (the most products per int32 lane), more than 8 rows; and it
    is far closer to the exact product than bfloat16 activations are."""
    layer = make_layer(n, k, QuantScheme(bits=8, group_size=None, symmetric=symmetric))
    x = torch.randn(m, k)
    x[:, 0] = 30.0  # an outlier channel: every row's first block has a large scale
    got = run_with(layer, "cpu_int8_a16", x)
    want = int16_activation_oracle(layer, x)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    exact = x.double() @ layer.dequantize(torch.float32).double().t() + layer.bias.double()
    bf16 = run_with(layer, "cpu_int8_avx512", x).double() if n % 16 == 0 else None
    if bf16 is not None:
        assert (got.double() - exact).abs().max() < (bf16 - exact).abs().max()


@pytest.mark.skipif(not AVX512, reason="needs a C++ compiler and an AVX-512 VNNI/BF16 CPU")
@pytest.mark.parametrize("scheme, name", [(QuantScheme(bits=4, group_size=32), "cpu_int4_a8"),
                                          (QuantScheme(bits=8, group_size=None, symmetric=True), "cpu_int8_a16"),
                                          (QuantScheme(bits=8, group_size=None, symmetric=False), "cpu_int8_a16")])
def test_default_kernels_hold_no_copy_of_the_weights(scheme, name):
    """int4 and int8 weights are held once: the default decode kernels read the layer's own buffers
    (what they keep is per-row or nothing: no tensor the size of the weight)."""
    layer = make_layer(64, 256, scheme)
    layer(torch.randn(1, 256))
    kernel, state = layer.kernel_state(torch.randn(1, 256))
    assert kernel.name == name
    held = [t for t in (state if isinstance(state, tuple) else (state,)) if isinstance(t, torch.Tensor)]
    assert all(t.numel() <= layer.out_features for t in held)


@pytest.mark.skipif(not AVX512, reason="needs a C++ compiler and an AVX-512 VNNI/BF16 CPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 6, 130])  # 130: prefill's dense path
def test_engine_binding_of_one_layer_equals_the_module(dtype, rows):
    """The engine calls compressed o_proj/down_proj/head through a bound kernel call (`decoder.single`):
    the same numbers as the module, for decode-sized and prefill-sized inputs, with the bias."""
    from slimlm.engine.decoder import OneLayer, single

    layer = make_layer(40, 256, QuantScheme(bits=4, group_size=32)).to(dtype)
    bound = single(layer, torch.zeros(1, 8, dtype=dtype))
    assert isinstance(bound, OneLayer)
    x = torch.randn(2, rows, 256).to(dtype)
    assert torch.equal(bound(x), layer(x))
    float_layer = nn.Linear(8, 8)
    assert single(float_layer, torch.zeros(1, 8)) is float_layer


@pytest.mark.skipif(not AVX512, reason="needs a C++ compiler and an AVX-512 VNNI/BF16 CPU")
@pytest.mark.parametrize("scheme, name", [(QuantScheme(bits=4, group_size=32), "cpu_int4_a8"),
                                          (QuantScheme(bits=8, group_size=None, symmetric=False), "cpu_int8_a16"),
                                          (QuantScheme(bits=8, group_size=None), "cpu_int8_avx512")])
def test_prefill_dequantizes_a_chunk_of_rows_at_a_time(monkeypatch, scheme, name):
    """Prefill's dense GEMM dequantizes DENSE_CHUNK weight rows at a time (a few MB of temporaries, not the
    whole bf16 weight): with chunks of 32 rows and a partial last one, it equals the GEMM on the whole
    dequantized weight."""
    import slimlm.quant.kernels.cpu_avx512 as avx

    layer = make_layer(80, 256, scheme)
    x = torch.randn(130, 256)
    from slimlm.quant.kernels import get_kernel

    kernel = get_kernel(name)
    state = kernel.prepare(layer, torch.float32)
    whole = torch.nn.functional.linear(x.bfloat16(), kernel.dense_weight(layer, state)).float()
    monkeypatch.setattr(avx, "DENSE_CHUNK", 32)
    chunked = kernel.dense_matmul(x, layer, state)
    torch.testing.assert_close(chunked, whole, rtol=1e-2, atol=1e-2 * float(whole.abs().max()))
    assert torch.equal(run_with(layer, name, x), chunked + layer.bias)
