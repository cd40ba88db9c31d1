"""config.json keys live in core/format.py, each block versioned: a newer version is a clear error."""

import json

import pytest
import torch

import slimlm
from slimlm.core import format as F
from slimlm.core.errors import SlimError
from slimlm.testing import tiny_model, tiny_tokenizer


def saved(tmp_path, method, **settings):
    model = tiny_model("llama")
    tok = tiny_tokenizer()
    verb = slimlm.prune if method in ("magnitude", "channels") else slimlm.quantize
    verb(model, method, tokenizer=tok, **settings)
    return slimlm.save(model, tmp_path / method, tok, format="slimlm")


@pytest.mark.parametrize("method, settings, key, field", [
    ("rtn", {"bits": 4}, F.QUANTIZATION, "format_version"),
    ("magnitude", {"sparsity": 0.5}, F.SPARSITY, "version"),
    ("channels", {"sparsity": 0.25, "scope": "global", "importance": "activation", "n_samples": 2, "seq_len": 16},
     F.MODULE_SHAPES, "version"),
    ("channels", {"sparsity": 0.25}, F.STRUCTURED, "version"),
])
def test_a_block_from_a_newer_slimlm_is_refused(tmp_path, method, settings, key, field):
    folder = saved(tmp_path, method, **settings)
    config = json.loads((folder / "config.json").read_text())
    assert config[key][field] == 1  # every block carries its version
    slimlm.load(folder)
    config[key][field] = 99
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SlimError, match=rf"newer slimlm \({key} format version 99"):
        slimlm.load(folder)


def test_module_shapes_of_the_first_release_still_load(tmp_path):
    """Before versions, slimlm_module_shapes was a plain name -> [out, in] map."""
    folder = saved(tmp_path, "channels", sparsity=0.25, scope="global", importance="activation", n_samples=2, seq_len=16)
    config = json.loads((folder / "config.json").read_text())
    config[F.MODULE_SHAPES] = config[F.MODULE_SHAPES]["layers"]
    (folder / "config.json").write_text(json.dumps(config))
    model, _ = slimlm.load(folder)
    assert model.model.layers[0].mlp.gate_proj.weight.shape[0] == config[F.MODULE_SHAPES]["model.layers.0.mlp.gate_proj"][0]


# A folder plain transformers would read wrongly must make it refuse, naming slimlm; one it can read
# (compressed-tensors) must load correctly.


def _plain(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.mark.parametrize("make", ["int4 g32, MLP width not a multiple of 32", "int3", "bitmask sparse"])
def test_folders_plain_transformers_would_misread_are_refused(tmp_path, make):
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab=len(tok), intermediate_size=80)
    if make.startswith("int4"):
        slimlm.quantize(model, "gptq", bits=4, group_size=32, calibration=torch.randint(0, len(tok), (4, 32)),
                        n_samples=4, seq_len=32)
    elif make == "int3":
        slimlm.quantize(model, "rtn", bits=3, group_size=32)
    else:
        slimlm.prune(model, "magnitude", sparsity=0.5)
    path = slimlm.save(model, tmp_path / "m", tok)
    raw = json.loads((path / "config.json").read_text())
    assert raw["model_type"] == "slimlm" and raw["slimlm_model_type"] == "llama"
    with pytest.raises(ValueError, match="model type `slimlm`"):
        _plain(path)
    loaded, _ = slimlm.load(path)  # slimlm itself reads it, and saves it again the same way
    ids = torch.randint(0, len(tok), (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    assert loaded.config.model_type == "llama"
    again = slimlm.save(loaded, tmp_path / "again", tok)
    assert json.loads((again / "config.json").read_text())["model_type"] == "slimlm"


def test_folders_plain_transformers_reads_are_not_guarded(tmp_path):
    pytest.importorskip("compressed_tensors")
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab=len(tok))
    slimlm.quantize(model, "rtn", bits=4, group_size=32)
    path = slimlm.save(model, tmp_path / "ct", tok)
    raw = json.loads((path / "config.json").read_text())
    assert raw["model_type"] == "llama" and "slimlm_model_type" not in raw
    _plain(path)  # loads; that it computes what slimlm does: tests/quant/test_compressed_tensors.py


def test_a_guarded_folder_without_its_model_type_is_reported_corrupt(tmp_path):
    with pytest.raises(SlimError, match="slimlm_model_type is missing.*corrupt"):
        F.unguard_({"model_type": "slimlm"}, tmp_path)
