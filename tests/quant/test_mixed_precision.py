import pytest
import torch

import slimlm
from slimlm.core.errors import SlimError
from slimlm.quant.linear import QuantizedLinear
from slimlm.quant.rtn import RTNConfig
from slimlm.testing import tiny_model, tiny_tokenizer

OVERRIDES = {"model.layers.0.*": "skip", "*.self_attn.*": {"bits": 8, "group_size": None, "symmetric": True}}


def schemes(model):
    return {name: m.scheme.label() for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_per_layer_schemes_in_one_call(method):
    model = tiny_model("llama")
    extra = {"calibration": torch.randint(0, 300, (4, 32))} if method != "rtn" else {}
    slimlm.quantize(model, method, bits=4, group_size=32, overrides=OVERRIDES, **extra)
    got = schemes(model)
    assert not any(n.startswith("model.layers.0.") for n in got)  # first block kept as it was
    assert got["model.layers.1.self_attn.q_proj"] == "int8 per-channel sym"
    assert got["model.layers.1.mlp.down_proj"] == "int4 g32 asym"
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)


def test_mixed_model_reloads_and_inspect_shows_it(tmp_path, capsys):
    model = slimlm.quantize(tiny_model("llama"), "rtn", bits=4, group_size=32, overrides=OVERRIDES)
    slimlm.save(model, tmp_path / "m", tiny_tokenizer())
    again, _ = slimlm.load(tmp_path / "m")
    assert schemes(again) == schemes(model)
    from slimlm.cli import main

    assert main(["inspect", str(tmp_path / "m"), "--layers"]) == 0
    out = capsys.readouterr().out
    assert "int8 per-channel sym" in out and "int4 g32 asym" in out and "float32" in out


def test_override_mistakes_are_caught_before_any_work():
    with pytest.raises(SlimError, match="must be 'skip' or scheme settings"):
        RTNConfig(overrides={"*.mlp.*": {"bitz": 8}})
    with pytest.raises(SlimError, match="bits=5"):
        RTNConfig(overrides={"*.mlp.*": {"bits": 5}})
    model = tiny_model("llama")
    before = model.model.layers[1].mlp.up_proj.weight.clone()
    with pytest.raises(SlimError, match="matches none"):
        slimlm.quantize(model, "rtn", overrides={"*.mlpp.*": "skip"})
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, before)


def test_cli_override_and_format(tmp_path):
    from slimlm.cli import main

    out = tmp_path / "q"
    args = ["quantize", "demo", "-o", str(out), "--format", "log", "--group-size", "32", "--eval-tokens", "0",
            "--override", "*.self_attn.*=format:int,bits:8,group_size:none", "--override", "model.layers.0.mlp.*=skip"]
    assert main(args) == 0
    model, _ = slimlm.load(out)
    got = schemes(model)
    assert got["model.layers.1.mlp.up_proj"] == "log4 g32" and got["model.layers.2.self_attn.v_proj"] == "int8 per-channel sym"
    assert "model.layers.0.mlp.up_proj" not in got
    assert main(["quantize", "demo", "-o", str(tmp_path / "x"), "--override", "oops"]) == 2
