import json

import pytest
import torch

import slimlm
from slimlm.core.errors import SlimError
from slimlm.eval.report import Report, VariantResult
from slimlm.eval.size import describe_layers, measure_size, parameter_count
from slimlm.eval.speed import BenchSettings, decode_bytes_per_step, measure_speed
from slimlm.testing import tiny_model


def test_size_figures_follow_the_scheme():
    fp32 = tiny_model("mistral", hidden=128)
    n_params = parameter_count(fp32)
    s32 = measure_size(fp32)
    assert s32.parameters == sum(p.numel() for p in fp32.parameters())
    assert s32.linear_bits_per_weight == pytest.approx(32.0)
    q = slimlm.quantize(tiny_model("mistral", hidden=128), "rtn", bits=4, group_size=32, symmetric=True, head="float")
    s4 = measure_size(q)
    assert parameter_count(q) == n_params  # logical parameters do not change
    assert s4.linear_bits_per_weight == pytest.approx(4 + 16 / 32)  # codes + an fp16 scale per 32
    assert s4.weight_bytes < s32.weight_bytes
    rows = describe_layers(q)
    assert {r["scheme"] for r in rows} == {"int4 g32 sym", "float32"}  # lm_head stays float


def test_decode_bytes_skip_an_untied_input_embedding():
    untied = tiny_model("mistral")
    emb = untied.get_input_embeddings().weight
    from slimlm.eval.size import weight_bytes

    assert decode_bytes_per_step(untied) == weight_bytes(untied) - emb.numel() * 4
    tied = tiny_model("llama")
    assert decode_bytes_per_step(tied) == weight_bytes(tied)


def test_speed_measurement_structure():
    model = slimlm.quantize(tiny_model("llama"), "rtn", bits=4, group_size=32)
    result = measure_speed(model, BenchSettings(prompt_tokens=8, new_tokens=4, batch_sizes=(1, 2), repeats=1, warmup=0))
    assert result.ttft_ms > 0 and result.prefill_tps > 0 and result.decode_gbps > 0
    assert set(result.decode_tps) == {1, 2} and all(v > 0 for v in result.decode_tps.values())
    assert json.loads(json.dumps(result.to_dict()))["decode_tps"]["2"] > 0


def test_bench_settings_are_checked():
    with pytest.raises(SlimError):
        BenchSettings(batch_sizes=())
    with pytest.raises(SlimError, match="exceed"):
        measure_speed(tiny_model("llama"), BenchSettings(prompt_tokens=250, new_tokens=64))


def test_report_markdown_and_json():
    quality = {"perplexity": 10.0, "nll": 2.3, "tokens": 100, "kl": 0.0, "top1": 1.0}
    size = {"parameters": 10, "weight_bytes": 40, "bits_per_weight": 32.0, "linear_bits_per_weight": 32.0}
    speed = {"ttft_ms": 5.0, "prefill_tps": 100.0, "decode_tps": {"1": 50.0}, "decode_gbps": 1.0, "peak_memory_bytes": 0}
    r = Report("m", "demo", [VariantResult("fp32", "float32", quality, size, speed, 40),
                             VariantResult("int4", "rtn", {**quality, "perplexity": 11.0, "kl": 0.01, "top1": 0.9},
                                           {**size, "weight_bytes": 10}, {**speed, "decode_tps": {"1": 100.0}}, 10)])
    md = r.to_markdown()
    assert "| int4 | rtn | 11.000 | +10.00% | 0.01000 | 90.00% |" in md and "2.00x" in md
    assert json.loads(r.to_json())["variants"][1]["quality"]["top1"] == 0.9


def test_speed_with_a_quantized_output_head():
    """A quantized head is counted at its stored size in the bytes a decode step reads, and the bench runs
    every step's logits through it (its kernel), not through some float copy."""
    from slimlm.quant.linear import QuantizedLinear

    float_head = slimlm.quantize(tiny_model("mistral"), "rtn", bits=8, group_size=None, head="float")
    model = slimlm.quantize(tiny_model("mistral"), "rtn", bits=8, group_size=None, include=["*", "lm_head"])
    head = model.get_output_embeddings()
    assert isinstance(head, QuantizedLinear) and head.scheme.bits == 8 and head.kernel is None
    dense = float_head.get_output_embeddings().weight
    assert decode_bytes_per_step(model) == decode_bytes_per_step(float_head) - dense.nbytes + head.storage_bytes()
    assert head.storage_bytes() < dense.nbytes / 3  # int8 codes + per-row scale and zero, not float32
    calls = []
    head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    from slimlm.quant.kernels import cpu_avx512

    bind = cpu_avx512.CpuInt8A16Kernel.bind

    def counting_bind(self, layers, states):  # the engine calls a bound kernel for the head, not the module
        fn = bind(self, layers, states)
        return (lambda x: calls.append(x.shape[0]) or fn(x)) if head in layers else fn

    settings = BenchSettings(prompt_tokens=4, new_tokens=3, batch_sizes=(1,), repeats=1, warmup=0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_avx512.CpuInt8A16Kernel, "bind", counting_bind)
        result = measure_speed(model, settings)
    assert head.kernel is not None  # chosen on the head's first forward
    assert len(calls) >= settings.new_tokens  # prefills and every decode step: logits come from this layer
    assert result.decode_tps[1] > 0
    assert result.decode_gbps == pytest.approx(decode_bytes_per_step(model) * result.decode_tps[1] / 1e9)


@pytest.mark.parametrize("high_water_mark", [True, False])
def test_peak_memory_sees_a_freed_allocation(monkeypatch, high_water_mark):
    """The peak counts memory freed before the block ends: from the kernel's high-water mark, or (where
    it cannot be reset) from the sampling thread, whose samples catch an allocation held for 50 ms."""
    import time

    from slimlm.eval import memory

    if not high_water_mark:
        monkeypatch.setattr(memory, "reset_peak_rss", lambda: False)
    with memory.PeakMemory("cpu") as mem:
        block = torch.ones(50_000_000)  # 200 MB, touched
        time.sleep(0.05)
        del block
    assert (mem._thread is None) == (high_water_mark and memory.peak_rss() > 0)
    assert 190e6 < mem.peak_bytes < 400e6
