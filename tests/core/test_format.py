"""config.json keys live in core/format.py, each block versioned: a newer version is a clear error."""

import json

import pytest

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
