import json

import pytest
import torch

import slimlm
from slimlm.core.data import encode_documents, read_documents
from slimlm.core.errors import SlimError
from slimlm.core.layers import linear_layers, output_head_name
from slimlm.core.targeting import select_linear
from slimlm.quant.linear import QuantizedLinear
from slimlm.testing import tiny_model, tiny_tokenizer


def test_default_targets_every_linear_but_the_head():
    model = tiny_model("mistral")
    chosen = select_linear(model)
    assert output_head_name(model) == "lm_head"
    assert "lm_head" not in chosen and len(chosen) == len(linear_layers(model)) - 1


def test_include_exclude_globs():
    model = tiny_model("llama")
    chosen = select_linear(model, include=["*.mlp.*"], exclude=["*.down_proj"])
    assert chosen and all(".mlp." in n and not n.endswith("down_proj") for n in chosen)
    assert "lm_head" in select_linear(model, include=["lm_head"])


def test_glob_that_matches_nothing_is_an_error():
    with pytest.raises(SlimError, match="matches no linear layer"):
        select_linear(tiny_model("llama"), include=["*.mlpp.*"])


def test_gpt2_conv1d_counts_as_linear():
    model = tiny_model("gpt2")
    names = list(linear_layers(model))
    assert any(n.endswith("attn.c_attn") for n in names)
    ids = torch.arange(12)[None]
    with torch.no_grad():
        before = model(ids).logits
        slimlm.quantize(model, "rtn", bits=8, group_size=None, symmetric=True)
        after = model(ids).logits
    assert isinstance(model.transformer.h[0].attn.c_attn, QuantizedLinear)
    assert (before - after).abs().max() < 0.05 * before.abs().max()


def test_quantize_rejects_unknown_method_and_settings():
    model = tiny_model("llama")
    with pytest.raises(SlimError, match="valid: .*rtn"):
        slimlm.quantize(model, "magic")
    with pytest.raises(SlimError, match="unknown rtn setting"):
        slimlm.quantize(model, "rtn", bitz=4)


def test_int8_is_closer_than_int4_than_int2():
    ids = torch.arange(20)[None]
    ref = tiny_model("qwen2")
    with torch.no_grad():
        base = ref(ids).logits
        errs = []
        for bits in (8, 4, 2):
            m = slimlm.quantize(tiny_model("qwen2"), "rtn", bits=bits, group_size=32)
            errs.append((m(ids).logits - base).abs().mean().item())
    assert errs[0] < errs[1] < errs[2]


def test_quantized_weight_equals_the_oracle():
    from slimlm.quant.primitives import fake_quantize
    from slimlm.quant.scheme import QuantScheme

    model = tiny_model("llama")
    w = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    slimlm.quantize(model, "rtn", bits=3, group_size=32, symmetric=True)
    layer = model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.dequantize(), fake_quantize(w, QuantScheme(bits=3, group_size=32, symmetric=True)))


def test_read_txt_jsonl_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n<|endoftext|>\nsecond doc\n")
    assert read_documents(tmp_path / "a.txt") == ["first doc", "second doc"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x y"}) + "\n\n" + json.dumps({"text": "z"}) + "\n")
    assert read_documents(tmp_path / "b.jsonl") == ["x y", "z"]
    (tmp_path / "c.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(SlimError, match='line 1 has no "text"'):
        read_documents(tmp_path / "c.jsonl")
    (tmp_path / "d.jsonl").write_text("{oops\n")
    with pytest.raises(SlimError, match="not valid JSON"):
        read_documents(tmp_path / "d.jsonl")
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(SlimError, match="holds no text"):
        read_documents(tmp_path / "e.txt")
    (tmp_path / "f.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(SlimError, match="UTF-8"):
        read_documents(tmp_path / "f.txt")
    with pytest.raises(SlimError, match="does not exist"):
        read_documents(tmp_path / "missing.txt")


def test_documents_start_with_bos():
    tok = tiny_tokenizer()
    ids = encode_documents(tok, ["one two", "three"])
    assert ids[0].item() == tok.bos_token_id
    assert (ids == tok.bos_token_id).sum().item() == 2
    assert encode_documents(tok, ["one two three four"], max_tokens=3).numel() == 3


def test_demo_corpus_is_there():
    docs = read_documents("demo")
    assert len(docs) > 10 and sum(map(len, docs)) > 20_000


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_nan_weights_are_refused_before_quantizing(method):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 3] = float("nan")
    extra = {"calibration": torch.arange(300) % 200, "n_samples": 2, "seq_len": 16} if method == "gptq" else {}
    with pytest.raises(SlimError, match="layers.1.mlp.down_proj' has NaN"):
        slimlm.quantize(model, method, bits=4, group_size=32, **extra)
