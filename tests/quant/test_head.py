"""The output head's default: int8 per-channel when the body is quantized and the head is its own
matrix; left in float when tied to the embeddings (unless asked), when --include names it (the
body's scheme), or when a step targets only some layers."""

import pytest
import torch
from torch import nn

import slimlm
from slimlm.cli import main
from slimlm.core.errors import SlimError
from slimlm.quant.linear import QuantizedLinear
from slimlm.testing import tiny_model, tiny_tokenizer

IDS = torch.arange(1, 13)[None]


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_untied_head_becomes_int8_per_channel_by_default():
    model = tiny_model("mistral")
    embed = model.get_input_embeddings().weight.clone()
    dense_head = model.lm_head.weight.clone()
    slimlm.quantize(model, "rtn", bits=4, group_size=32)
    head = model.get_output_embeddings()
    assert isinstance(head, QuantizedLinear) and head.scheme.label() == "int8 per-channel sym"
    assert torch.equal(model.get_input_embeddings().weight, embed)  # the embedding is not touched
    # one scale per vocabulary row: every row's error within half a step of its own scale
    err = (head.dequantize(torch.float32) - dense_head).abs()
    assert bool((err <= head.scale.float() / 2 + 1e-6).all())

    kept = slimlm.quantize(tiny_model("mistral"), "rtn", bits=4, group_size=32, head="float")
    assert type(kept.get_output_embeddings()) is nn.Linear
    named = slimlm.quantize(tiny_model("mistral"), "rtn", bits=4, group_size=32, include=["*", "lm_head"])
    assert named.get_output_embeddings().scheme.label() == "int4 g32 asym"  # --include lm_head: the body's scheme
    partial = slimlm.quantize(tiny_model("mistral"), "rtn", bits=4, group_size=32, include=["*.mlp.*"])
    assert type(partial.get_output_embeddings()) is nn.Linear  # a partial step (the planner's) leaves it


def test_tied_head_stays_float_unless_asked_and_then_unties(tmp_path):
    model = slimlm.quantize(tiny_model("llama"), "rtn", bits=4, group_size=32)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # auto keeps the tie

    model = tiny_model("llama")
    embed = model.get_input_embeddings().weight.clone()
    slimlm.quantize(model, "rtn", bits=4, group_size=32, head="int8")
    assert isinstance(model.get_output_embeddings(), QuantizedLinear)
    assert model.config.tie_word_embeddings is False
    assert torch.equal(model.get_input_embeddings().weight, embed)
    expected = logits(model)
    slimlm.save(model, tmp_path / "q", tiny_tokenizer(), format="slimlm")
    loaded, _ = slimlm.load(tmp_path / "q")
    # loading must not tie the float embedding back onto the quantized head
    assert not list(loaded.get_output_embeddings().parameters())
    assert torch.equal(logits(loaded), expected)


@pytest.mark.parametrize("method, settings", [("gptq", {}), ("awq", {"grid": 2, "clip": False})])
def test_calibrated_methods_give_the_head_int8_too(method, settings):
    model = tiny_model("mistral")
    calib = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    slimlm.quantize(model, method, calibration=calib, bits=4, group_size=32, **settings)
    assert model.get_output_embeddings().scheme.label() == "int8 per-channel sym"


def test_awq_without_quantizing_leaves_the_head_for_the_next_step():
    model = tiny_model("mistral")
    calib = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    slimlm.quantize(model, "awq", calibration=calib, quantize=False, grid=2, clip=False, bits=4, group_size=32)
    assert type(model.get_output_embeddings()) is nn.Linear


def test_bad_head_value_and_cli(tmp_path, capsys):
    with pytest.raises(SlimError, match="head 'int4' is not one of auto, int8, float"):
        slimlm.quantize(tiny_model("mistral"), "rtn", head="int4")
    folder = tmp_path / "m"
    slimlm.save(tiny_model("mistral"), folder, tiny_tokenizer())
    assert main(["quantize", str(folder), "-o", str(tmp_path / "x"), "--bits", "4", "--dry-run"]) == 0
    assert "int8 per-channel sym (output head): 1 layers: lm_head" in capsys.readouterr().out
    assert main(["quantize", str(folder), "-o", str(tmp_path / "x"), "--bits", "4", "--head", "float", "--dry-run"]) == 0
    assert "lm_head" not in capsys.readouterr().out
