"""Dense Hugging Face export: plain transformers loads the folder and computes what slimlm did."""

from __future__ import annotations

import json

import pytest
import torch

import slimlm
from slimlm.core.errors import SlimError
from slimlm.testing import tiny_model, tiny_tokenizer


def _plain_logits(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("method,settings", [
    ("rtn", dict(bits=3, group_size=32)),  # int3: compressed-tensors cannot express it
    ("rtn", dict(bits=4, group_size=64, format="log")),
])
def test_quantized_models_load_in_plain_transformers(tmp_path, method, settings):
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab=len(tok))
    slimlm.quantize(model, method, **settings)
    ids = torch.randint(0, len(tok), (1, 16))
    with torch.no_grad():
        want = model(ids).logits
    out = slimlm.export(model, tmp_path / "dense", tok, format="hf")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and not any(k.startswith("slimlm") for k in config)
    torch.testing.assert_close(_plain_logits(out, ids), want, rtol=1e-4, atol=1e-4)


def test_pruned_model_saved_as_bitmask_exports_dense_with_its_zeros(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model("qwen2", vocab=len(tok))
    slimlm.prune(model, "magnitude", sparsity=0.5, pattern="2:4")
    saved = slimlm.save(model, tmp_path / "pruned", tok)
    assert "slimlm_sparsity" in json.loads((saved / "config.json").read_text())
    loaded, tok2 = slimlm.load(saved)
    ids = torch.randint(0, len(tok), (1, 12))
    with torch.no_grad():
        want = loaded(ids).logits
    out = slimlm.export(loaded, tmp_path / "dense", tok2, format="hf")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    w = plain.model.layers[0].mlp.up_proj.weight
    assert (w == 0).float().mean() == 0.5
    torch.testing.assert_close(_plain_logits(out, ids), want, rtol=1e-5, atol=1e-5)


def test_per_layer_shapes_are_refused(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab=len(tok))
    model.config.slimlm_module_shapes = {"version": 1, "layers": {"model.layers.0.mlp.up_proj": [100, 64]}}
    with pytest.raises(SlimError, match="different sizes per layer"):
        slimlm.export(model, tmp_path / "dense", tok, format="hf")
    assert not (tmp_path / "dense").exists()
