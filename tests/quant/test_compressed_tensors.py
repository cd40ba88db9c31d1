import json

import pytest
import torch

import slimlm
from slimlm.core.errors import SlimError
from slimlm.quant.compressed_tensors_io import export_reason, pack_int32, unpack_int32
from slimlm.quant.linear import QuantizedLinear
from slimlm.testing import tiny_model, tiny_tokenizer

SCHEMES = [dict(bits=4, group_size=32, symmetric=False), dict(bits=4, group_size=None, symmetric=True),
           dict(bits=8, group_size=None, symmetric=True), dict(bits=4, group_size=64, symmetric=True)]


def ids(seed=0):
    return torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(seed))


def reference_logits(model):
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.set_kernel_("reference")
    with torch.no_grad():
        return model(ids()).logits


def quantization_config(path):
    return json.loads((path / "config.json").read_text())["quantization_config"]


def test_packing_layout():
    """Eight 4-bit codes per int32, element c at bit 4c: codes 1..8 -> 0x87654321 (as int32)."""
    words = pack_int32(torch.arange(1, 9, dtype=torch.uint8)[None], 4)
    assert words.dtype == torch.int32 and words.item() == 0x87654321 - 2**32
    assert pack_int32(torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8), 8).item() == 0x04030201
    for bits in (2, 4, 8):
        codes = torch.randint(0, 2**bits, (5, 37), dtype=torch.uint8)
        assert torch.equal(unpack_int32(pack_int32(codes, bits), bits, 37), codes)


def test_packing_matches_the_compressed_tensors_package():
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import pack_to_int32

    codes = torch.randint(0, 16, (6, 64), dtype=torch.uint8)
    theirs = pack_to_int32((codes.to(torch.int16) - 8).to(torch.int8), 4)  # the package packs signed values, offset by 2^(b-1)
    assert torch.equal(pack_int32(codes, 4), theirs)


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "phi3"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"int{s['bits']}-g{s['group_size']}-{'sym' if s['symmetric'] else 'asym'}")
def test_plain_transformers_and_slimlm_load_the_same_model(family, scheme, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    # untied heads (phi3) get the default int8 head, which transformers loads beside symmetric layers only
    head = "auto" if scheme["symmetric"] else "float"
    model = slimlm.quantize(tiny_model(family), "rtn", **scheme, head=head)
    expected = reference_logits(model)
    slimlm.save(model, tmp_path / "m", tiny_tokenizer())
    q = quantization_config(tmp_path / "m")
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert not any(info.values())  # no missing, unexpected or mismatched keys
    with torch.no_grad():
        torch.testing.assert_close(hf(ids()).logits, expected, rtol=0, atol=1e-6)
    ours, _ = slimlm.load(tmp_path / "m")
    assert sum(isinstance(m, QuantizedLinear) for m in ours.modules()) == sum(
        isinstance(m, QuantizedLinear) for m in model.modules())
    torch.testing.assert_close(reference_logits(ours), expected, rtol=0, atol=1e-6)


def test_calibrated_and_mixed_models_export(tmp_path):
    """GPTQ/AWQ codes are ordinary codes; a mixed int8/int4 model gets one config group per scheme."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    slimlm.quantize(model, "gptq", calibration=calib, bits=8, group_size=None, symmetric=True, include=["*.self_attn.*"])
    slimlm.quantize(model, "awq", calibration=calib, bits=4, group_size=32, symmetric=True, include=["*.mlp.*"])
    expected = reference_logits(model)
    slimlm.save(model, tmp_path / "m", tiny_tokenizer())
    q = quantization_config(tmp_path / "m")
    assert len(q["config_groups"]) == 2 and "lm_head" in q["ignore"]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(hf(ids()).logits, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(reference_logits(slimlm.load(tmp_path / "m")[0]), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case, reason", [
    (lambda: slimlm.quantize(tiny_model("gpt2"), "rtn", bits=4, group_size=32), "Conv1D"),
    (lambda: slimlm.quantize(tiny_model("llama"), "rtn", bits=3, group_size=32), "int4 and int8"),
    (lambda: slimlm.quantize(tiny_model("llama", hidden=96), "rtn", bits=4, group_size=64), "does not divide"),
    (lambda: slimlm.quantize(slimlm.quantize(tiny_model("llama"), "rtn", bits=8, include=["*.mlp.*"]), "rtn", bits=4,
                             group_size=32), "asymmetric"),
])
def test_what_the_format_cannot_express_is_saved_in_slimlm_format(case, reason, tmp_path):
    model = case()
    assert reason in export_reason(model)
    slimlm.save(model, tmp_path / "m", tiny_tokenizer())
    assert quantization_config(tmp_path / "m")["quant_method"] == "slimlm"
    with pytest.raises(SlimError, match="cannot save as compressed-tensors"):
        slimlm.save(model, tmp_path / "n", tiny_tokenizer(), format="compressed-tensors")
    assert not (tmp_path / "n").exists()


def test_slimlm_format_can_be_forced(tmp_path):
    model = slimlm.quantize(tiny_model("llama"), "rtn", bits=4, group_size=32)
    slimlm.save(model, tmp_path / "m", tiny_tokenizer(), format="slimlm")
    assert quantization_config(tmp_path / "m")["quant_method"] == "slimlm"
    with pytest.raises(SlimError, match="unknown save format"):
        slimlm.save(model, tmp_path / "x", format="gguf")
