"""The fused C++ decode step against the engine's PyTorch path (the oracle) and its pieces against
PyTorch ops."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimlm
from slimlm.core.errors import SlimError
from slimlm.engine import fused
from slimlm.engine.torch_ops import apply_rope, attention_mask, decode_attention
from slimlm.engine.engine import Engine
from tests.engine.test_engine import FAMILIES, ids, model_for

OPS = fused.ops()
pytestmark = pytest.mark.skipif(OPS is None, reason="needs a C++ compiler")


def decode_both(model, steps=6, prompts=(7, 12)):
    """Logits (steps, B, V) of the fused and the PyTorch decode step, fed the same tokens, for slots
    holding prompts of different lengths."""
    engines = [Engine(model, slots=len(prompts), max_len=64), Engine(model, slots=len(prompts), max_len=64,
                                                                      fused_step=False)]
    assert engines[0].fused is not None, engines[0].fused_reason
    slots = torch.arange(len(prompts))
    logits = [torch.stack([e.prefill(i, ids(n, seed=i)) for i, n in enumerate(prompts)]) for e in engines]
    out = [[], []]
    for _ in range(steps):
        tokens = logits[1].argmax(-1)  # the oracle's tokens drive both
        logits = [e.decode(slots, tokens) for e in engines]
        for o, lg in zip(out, logits):
            o.append(lg.float())
    return torch.stack(out[0]), torch.stack(out[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_step_equals_pytorch_step_fp32(family):
    got, want = decode_both(model_for(family))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_step_equals_pytorch_step_bf16(family):
    """bfloat16 rounds where PyTorch rounds; only summation order differs (attention)."""
    got, want = decode_both(model_for(family).to(torch.bfloat16))
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_fused_step_with_sliding_window():
    got, want = decode_both(model_for("mistral", sliding_window=4), steps=10)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fused_step_on_int4_model_runs_qkv_in_one_call():
    model = model_for("llama").to(torch.bfloat16)
    slimlm.quantize(model, "rtn", bits=4, group_size=32)
    got, want = decode_both(model)
    assert torch.equal(got, want)  # llama in bf16: the same roundings in the same order


def test_fused_step_is_refused_where_it_cannot_run():
    model = model_for("llama")
    engine = Engine(model, slots=1, max_len=32, kv_dtype="int8")
    assert engine.fused is None and "quantized" in engine.fused_reason
    with pytest.raises(SlimError, match="fused decode step cannot run"):
        Engine(model, slots=1, max_len=32, kv_dtype="int8", fused_step=True)


class ScaledNorm(nn.Module):
    """Not an RMSNorm: the numerical check must reject it."""

    def __init__(self, norm):
        super().__init__()
        self.norm, self.weight, self.variance_epsilon = norm, norm.weight, norm.variance_epsilon

    def forward(self, x):
        return 2 * self.norm(x)


def test_a_norm_that_is_not_rmsnorm_disables_the_fused_step():
    model = model_for("llama")
    model.model.norm = ScaledNorm(model.model.norm)
    engine = Engine(model, slots=1, max_len=32)
    assert engine.fused is None and "RMSNorm" in engine.fused_reason


def test_cache_overflow_is_a_clear_error():
    model = model_for("llama")
    engine = Engine(model, slots=1, max_len=8)
    logits = engine.prefill(0, ids(6))
    engine.decode(torch.tensor([0]), logits.argmax(-1)[None])
    with pytest.raises(SlimError):
        for _ in range(3):
            engine.decode(torch.tensor([0]), logits.argmax(-1)[None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_and_silu_mul_match_pytorch(dtype):
    model = model_for("llama").to(dtype)
    norm = model.model.norm
    h, delta = torch.randn(3, 64).to(dtype), torch.randn(3, 64).to(dtype)
    summed = h + delta
    got = OPS.add_rms_norm(h, delta, norm.weight, norm.variance_epsilon)
    assert torch.equal(h, summed)  # the residual is added in place
    torch.testing.assert_close(got, norm(summed), rtol=1e-6 if dtype == torch.float32 else 0, atol=1e-6 if dtype == torch.float32 else 0)
    gate, up = torch.randn(2, 40).to(dtype), torch.randn(2, 40).to(dtype)
    torch.testing.assert_close(OPS.silu_mul(gate, up), F.silu(gate) * up, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rotary, window", [(16, 0), (8, 0), (16, 5)])
def test_rope_attend_matches_pytorch(rotary, window):
    """Two rows at different positions of a paged cache (6 blocks of 4 tokens, tables in any block
    order), GQA 4/2, partial rotary, against rotate / write / gather / attend in PyTorch."""
    b, h, hkv, d, bs = 2, 4, 2, 16, 4
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, n * d, generator=gen) for n in (h, hkv, hkv))
    cos, sin = torch.randn(b, rotary, generator=gen), torch.randn(b, rotary, generator=gen)
    kc, vc = torch.randn(6, hkv, bs, d, generator=gen), torch.randn(6, hkv, bs, d, generator=gen)
    tables, pos = torch.tensor([[4, 1, 5], [2, 3, 0]]), torch.tensor([9, 6])
    qr = apply_rope(q.view(b, h, 1, d), cos[:, None], sin[:, None])
    kr = apply_rope(k.view(b, hkv, 1, d), cos[:, None], sin[:, None])
    kc2, vc2 = kc.clone(), vc.clone()
    for i in range(b):
        block, offset = tables[i, pos[i] // bs], pos[i] % bs
        kc2[block, :, offset] = kr[i, :, 0]
        vc2[block, :, offset] = v.view(b, hkv, d)[i]
    length = 3 * bs
    keys = kc2[tables].transpose(1, 2).reshape(b, hkv, length, d)  # each row's positions in order
    values = vc2[tables].transpose(1, 2).reshape(b, hkv, length, d)
    mask = attention_mask(pos[:, None], length, window or None)
    want = decode_attention(qr, keys, values, mask, 0.25).reshape(b, h * d)
    got = OPS.rope_attend(q.clone(), k.clone(), v, cos, sin, kc, vc, tables, pos, window, 0.25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kc, kc2)
    torch.testing.assert_close(vc, vc2)
    with pytest.raises(RuntimeError, match="beyond"):
        OPS.rope_attend(q.clone(), k.clone(), v, cos, sin, kc, vc, tables, torch.tensor([12, 0]), window, 0.25)


@pytest.mark.parametrize("family, overrides", [("llama", {}), ("mistral", {"sliding_window": 4}), ("phi3", {}),
                                               ("qwen3", {})])
def test_static_decode_for_cuda_graphs_equals_the_dynamic_step(family, overrides):
    """The graph-capturable step (whole-cache attention, device-side indices) gives the same logits;
    run on CPU here, captured on GPUs (benchmarks/cuda_check.py)."""
    from slimlm.engine.graphs import StaticOps, static_decode

    model = model_for(family, **overrides)
    dynamic = Engine(model, slots=2, max_len=40, fused_step=False)
    static = Engine(model, slots=2, max_len=40, fused_step=False, block_size=4)  # tables of 10 blocks
    prompts = [ids(5, seed=1), ids(9, seed=2)]
    for e in (dynamic, static):
        for i, p in enumerate(prompts):
            e.prefill(i, p)
    tokens = torch.tensor([3, 7])
    for _ in range(8):
        want = dynamic.decode(torch.arange(2), tokens)
        static._reserve({0: int(static.lengths[0]) + 1, 1: int(static.lengths[1]) + 1})
        got = static_decode(static.plan, StaticOps(static.spec, static.cache), tokens, static.lengths.clone(),
                            static.tables)
        static.lengths += 1
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        tokens = want.argmax(-1)


def test_cuda_graphs_need_cuda():
    with pytest.raises(SlimError, match="CUDA graphs"):
        Engine(model_for("llama"), slots=1, max_len=16, cuda_graphs=True)


@pytest.mark.parametrize("rope, table", [({"rope_type": "linear", "factor": 2.0}, True),
                                         ({"rope_type": "dynamic", "factor": 2.0}, False)])
def test_rope_table_only_for_position_only_types(rope, table):
    """Static RoPE types are looked up in a table computed once (same numbers as the module per step);
    "dynamic" depends on the sequence length, so it is computed every step."""
    from slimlm.testing import tiny_model

    model = tiny_model("llama", rope_parameters={**rope, "rope_theta": 10000.0})
    got, want = decode_both(model)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    engine = Engine(model, slots=1, max_len=64)
    engine.prefill(0, ids(5))
    engine.decode(torch.tensor([0]), torch.tensor([3]))
    assert (engine.fused._rope is not None) == table
