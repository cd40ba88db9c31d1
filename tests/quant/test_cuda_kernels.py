"""CUDA kernels: the device-independent parts run on CPU here; the full kernels run where CUDA is
(skipped otherwise; benchmarks/cuda_check.py runs them on a GPU machine)."""

import pytest
import torch
from torch import nn

from slimlm.quant.kernels import choose_kernel, get_kernel
from slimlm.quant.linear import QuantizedLinear
from slimlm.quant.scheme import QuantScheme

CUDA = torch.cuda.is_available()


def make_layer(n, k, scheme, seed=0):
    torch.manual_seed(seed)
    return QuantizedLinear.from_float(nn.Linear(k, n, bias=True), scheme)


@pytest.mark.parametrize("symmetric", [True, False])
def test_cuda_int8_math_matches_reference_on_cpu(symmetric):
    """The int8 kernel's arithmetic is device-independent: check it on CPU through prepare/run."""
    layer = make_layer(48, 64, QuantScheme(bits=8, group_size=None, symmetric=symmetric))
    kernel = get_kernel("cuda_int8")
    x = torch.randn(5, 64)
    got = kernel.run(x, layer, kernel.prepare(layer, torch.float32))
    want = x @ layer.dequantize(torch.float32).t()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group, symmetric", [(32, False), (128, True)])
def test_cuda_int4_dense_weight_is_the_dequantized_weight(group, symmetric):
    layer = make_layer(32, 256, QuantScheme(bits=4, group_size=group, symmetric=symmetric))
    kernel = get_kernel("cuda_int4")
    scale = layer.scale.float()
    zero = layer.zero_points().float()
    state = (None, group, None, scale.bfloat16()[..., None], zero.bfloat16()[..., None])
    dense = kernel.dense_weight(layer, state).float()
    want = layer.dequantize(torch.float32)
    torch.testing.assert_close(dense, want, rtol=2**-7, atol=0)  # scale and product each rounded to bf16


def test_cuda_kernels_are_not_chosen_on_cpu():
    layer = make_layer(32, 256, QuantScheme(bits=4, group_size=32))
    assert not get_kernel("cuda_int4").supports(layer, torch.device("cpu"))
    assert choose_kernel(layer, torch.device("cpu")).name.startswith("cpu_")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("scheme", [QuantScheme(bits=4, group_size=32, symmetric=False),
                                    QuantScheme(bits=4, group_size=128, symmetric=True),
                                    QuantScheme(bits=8, group_size=None, symmetric=True),
                                    QuantScheme(bits=8, group_size=None, symmetric=False)])
@pytest.mark.parametrize("m", [1, 7, 200])
def test_cuda_kernels_match_reference(scheme, m):
    layer = make_layer(64, 256, scheme).cuda()
    x = torch.randn(m, 256, device="cuda").bfloat16().float()
    layer.set_kernel_("reference")
    ref = layer(x)
    layer.set_kernel_(None)
    fast = layer(x)
    assert layer.kernel in ("cuda_int4", "cuda_int8")
    assert (fast - ref).abs().max() <= 1e-2 * ref.abs().max()
