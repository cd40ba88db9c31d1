import pytest
import torch

from slimlm.core.errors import SlimError
from slimlm.quant import primitives as P
from slimlm.quant.scheme import QuantScheme


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [8, 13, 64, 100])
def test_pack_unpack_roundtrip(bits, k):
    codes = torch.randint(0, 2**bits, (5, k), dtype=torch.uint8)
    packed = P.pack(codes, bits)
    if bits < 8:
        assert packed.shape == (5, -(-k // 8) * bits)  # bits/8 bytes per code, padded to 8 codes
    assert torch.equal(P.unpack(packed, bits, k), codes)


def test_int4_packing_is_low_nibble_first():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    assert P.pack(codes, 4).tolist() == [[0x21, 0x43, 0x65, 0x87]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 32])
def test_rounding_error_is_at_most_half_a_step(bits, symmetric, group_size):
    torch.manual_seed(0)
    w = torch.randn(16, 96)
    scheme = QuantScheme(bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype="float32")
    scale, zero = P.compute_qparams(w, scheme)
    deq = P.dequantize(P.quantize(w, scale, zero, scheme), scale, zero, 96)
    g = group_size or 96
    step = scale.repeat_interleave(g, dim=1)[:, :96]
    err = (w - deq).abs()
    # symmetric schemes clip the one value that would round to +2^(b-1); allow one step there
    bound = step * (1.0 if symmetric else 0.5) + 1e-6
    assert (err <= bound).all()


def test_asymmetric_represents_zero_exactly_and_codes_in_range():
    w = torch.rand(4, 64) + 0.5  # all positive: the range is widened to include 0
    scheme = QuantScheme(bits=3, group_size=32, symmetric=False)
    scale, zero = P.compute_qparams(w, scheme)
    codes = P.quantize(w, scale, zero, scheme)
    assert codes.max() <= 7 and zero.min() >= 0
    zeros = P.quantize(torch.zeros(4, 64), scale, zero, scheme)
    assert torch.equal(P.dequantize(zeros, scale, zero, 64), torch.zeros(4, 64))


def test_group_that_does_not_divide_k_is_padded():
    torch.manual_seed(1)
    w = torch.randn(8, 100)  # 100 = 3 groups of 32 + 4
    scheme = QuantScheme(bits=4, group_size=32)
    scale, zero = P.compute_qparams(w, scheme)
    assert scale.shape == (8, 4)
    codes = P.quantize(w, scale, zero, scheme)
    assert codes.shape == (8, 128)
    deq = P.dequantize(codes, scale, zero, 100)
    assert deq.shape == (8, 100)
    assert (w - deq).abs().max() < scale.float().max()


def test_group_wider_than_layer_is_per_channel():
    scheme = QuantScheme(bits=4, group_size=128)
    assert P.group_size_for(64, scheme) == 64 and P.padded_k(64, scheme) == 64


def test_all_zero_group_survives():
    w = torch.zeros(2, 32)
    out = P.fake_quantize(w, QuantScheme(bits=4, group_size=32))
    assert torch.equal(out, w)


@pytest.mark.parametrize(
    "settings, needle",
    [({"bits": 5}, "bits=5"), ({"bits": 5.5}, "bits=5.5"), ({"group_size": -1}, "group size -1"),
     ({"group_size": 48}, "group size 48"), ({"scale_dtype": "int8"}, "scale dtype")],
)
def test_impossible_schemes_are_rejected(settings, needle):
    with pytest.raises(SlimError, match=needle):
        QuantScheme(**settings)


def test_the_default_group_size_follows_the_bits_and_is_picked_again_when_an_override_changes_them():
    from slimlm.quant.rtn import RTNConfig

    assert QuantScheme(bits=8).group_size is None and QuantScheme(bits=8, format="fp8", symmetric=True).group_size is None
    assert QuantScheme(bits=4).group_size == 128 == QuantScheme(bits=2).group_size
    assert QuantScheme(bits=8, group_size=32).group_size == 32  # given: kept
    config = RTNConfig(bits=8, overrides={"*.mlp.*": {"bits": 4}, "*.o_proj": {"group_size": 64}})
    assert config.scheme_for("model.layers.0.mlp.up_proj").label() == "int4 g128 asym"
    assert config.scheme_for("model.layers.0.self_attn.o_proj").label() == "int8 g64 asym"
    assert config.scheme_for("model.layers.0.self_attn.q_proj").label() == "int8 per-channel asym"
    given = RTNConfig(bits=8, group_size=None, overrides={"*.mlp.*": {"bits": 4}})
    assert given.scheme_for("model.layers.0.mlp.up_proj").label() == "int4 per-channel asym"  # as the user set it
    assert RTNConfig.from_dict(config.to_dict()).group_size is None  # saved resolved


def test_unknown_setting_lists_valid_ones():
    with pytest.raises(SlimError, match="valid: bits, group_size"):
        QuantScheme.from_dict({"bitz": 4})


def test_config_roundtrip_and_version():
    s = QuantScheme(bits=3, group_size=64, symmetric=True)
    assert QuantScheme.from_dict(s.to_dict()) == s
    with pytest.raises(SlimError, match="version"):
        QuantScheme.from_dict({**s.to_dict(), "version": 99})


@pytest.mark.parametrize("scheme", [QuantScheme(bits=3, group_size=32), QuantScheme(bits=4, group_size=None, symmetric=True)])
def test_clip_search_is_never_worse_than_min_max(scheme):
    torch.manual_seed(0)
    w = torch.randn(8, 64) * torch.rand(8, 64).pow(4) * 3  # heavy-tailed: clipping pays
    plain = (P.fake_quantize(w, scheme) - w).abs().pow(2.4).sum()
    scale, zero = P.search_qparams(w, scheme)
    searched = (P.dequantize(P.quantize(w, scale, zero, scheme), scale, zero, 64) - w).abs().pow(2.4).sum()
    assert searched <= plain + 1e-5
    assert searched < plain  # on heavy-tailed weights some range is shrunk
