"""GGUF export: read back with gguf's own reader and dequantized with gguf's own code, the file
holds slimlm's weights (exactly for floats and copied codes with float16 scales), every metadata key
llama.cpp needs, and the tokenizer's tokens; what cannot be written exactly is refused or, when asked,
re-quantized with its cost measured; no partial file is ever left."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import slimlm  # noqa: E402
from slimlm.core.errors import SlimError  # noqa: E402
from slimlm.exporters import gguf_blocks as B  # noqa: E402
from slimlm.exporters.gguf import export_gguf  # noqa: E402
from slimlm.quant.linear import QuantizedLinear  # noqa: E402
from slimlm.testing import tiny_model, tiny_tokenizer  # noqa: E402


def _tokenizer_folder(tmp_path, tok=None):
    folder = tmp_path / "tok"
    (tok or tiny_tokenizer()).save_pretrained(folder)
    return folder


def _model(family="llama", **kw):
    tok = tiny_tokenizer()
    return tiny_model(family, vocab=len(tok), **kw), tok


def _read(path):
    reader = gguf.GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


def _field(reader, key):
    return reader.fields[key].contents()


def _values(t) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)


def _hf_order(w: np.ndarray, name: str, config) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (an independent oracle: convert_hf_to_gguf's own formula,
    inverted)."""
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(name.split(".")[2])
    if heads is None:
        return w
    n = w.shape[0]
    return w.reshape(heads, n // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def _layers(model):
    for name, m in model.named_modules():
        if name.startswith("model.layers.") and name.rsplit(".", 1)[1] in GGUF_NAMES:
            i = name.split(".")[2]
            yield f"blk.{i}.{GGUF_NAMES[name.rsplit('.', 1)[1]]}.weight", m


@pytest.mark.parametrize("bits,symmetric,group,kind", [
    (4, True, 32, "Q4_0"), (4, False, 32, "Q4_1"), (4, True, 64, "Q4_0"), (4, False, 128, "Q4_1"),
    (8, True, None, "Q8_0"), (8, True, 32, "Q8_0"),
])
def test_copied_codes_dequantize_to_slimlm_weights(tmp_path, bits, symmetric, group, kind):
    model, tok = _model()
    slimlm.quantize(model, "rtn", bits=bits, group_size=group, symmetric=symmetric)
    out = tmp_path / "m.gguf"
    result = export_gguf(model, _tokenizer_folder(tmp_path, tok), out)
    reader, tensors = _read(out)
    checked = 0
    for gname, layer in _layers(model):
        t = tensors[gname]
        assert t.tensor_type.name == kind
        got = _hf_order(_values(t), gname, model.config)
        want = layer.dequantize(torch.float32).numpy()
        # float16 scales: the codes are copied and the scale is the same number, so the weights are equal
        # (Q4_1's min = -zero·scale is rounded to float16: within that rounding)
        tol = 0 if symmetric else 2e-3 * np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=0, atol=tol)
        checked += 1
    assert checked == 2 * 7 and len(result.copied) == 14
    assert result.scale_rounding == 0.0 if symmetric else 0 < result.scale_rounding < 2e-3


def test_scales_not_in_float16_are_rounded_and_the_error_reported(tmp_path):
    model, tok = _model()
    slimlm.quantize(model, "rtn", bits=4, group_size=32, symmetric=True, scale_dtype="float32")
    result = export_gguf(model, _tokenizer_folder(tmp_path, tok), tmp_path / "m.gguf")
    assert 0 < result.scale_rounding < 1e-3
    _, tensors = _read(tmp_path / "m.gguf")
    for gname, layer in _layers(model):
        want = layer.dequantize(torch.float32).numpy()
        got = _hf_order(_values(tensors[gname]), gname, model.config)
        assert np.abs(got - want).max() <= result.scale_rounding * np.abs(want).max() * 1.0001


@pytest.mark.parametrize("dtype,kind", [(torch.float32, "F32"), (torch.bfloat16, "BF16"), (torch.float16, "F16")])
def test_float_models_are_written_exactly(tmp_path, dtype, kind):
    model, tok = _model(family="qwen2")  # qwen2: q/k/v biases, no row permutation
    model.to(dtype)
    export_gguf(model, _tokenizer_folder(tmp_path, tok), tmp_path / "m.gguf")
    reader, tensors = _read(tmp_path / "m.gguf")
    assert _field(reader, "general.architecture") == "qwen2"
    for gname, layer in _layers(model):
        assert tensors[gname].tensor_type.name == kind
        np.testing.assert_array_equal(_values(tensors[gname]), layer.weight.detach().float().numpy())
    bias = model.model.layers[1].self_attn.k_proj.bias
    assert tensors["blk.1.attn_k.bias"].tensor_type.name == "F32"
    np.testing.assert_array_equal(_values(tensors["blk.1.attn_k.bias"]), bias.detach().float().numpy())
    np.testing.assert_array_equal(_values(tensors["token_embd.weight"]), model.model.embed_tokens.weight.detach().float().numpy())
    assert "output.weight" not in tensors  # tied to the embedding, as llama.cpp reads it


def test_llama_q_and_k_rows_are_permuted_like_convert_hf_to_gguf(tmp_path):
    model, tok = _model()
    export_gguf(model, _tokenizer_folder(tmp_path, tok), tmp_path / "m.gguf")
    _, tensors = _read(tmp_path / "m.gguf")
    q = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    heads = model.config.num_attention_heads
    # convert_hf_to_gguf.py's LlamaModel.permute
    oracle = q.reshape(heads, 2, q.shape[0] // heads // 2, *q.shape[1:]).swapaxes(1, 2).reshape(q.shape)
    np.testing.assert_array_equal(_values(tensors["blk.0.attn_q.weight"]), oracle)
    w = torch.randn(8 * 16, 5)
    assert torch.equal(torch.from_numpy(_hf_order(B.permute_rows(w, 8).numpy(), "blk.0.attn_q", model.config
                                                  if model.config.num_attention_heads == 8 else _Cfg(8))), w)


class _Cfg:
    def __init__(self, heads):
        self.num_attention_heads = self.num_key_value_heads = heads


def test_metadata_and_byte_level_vocabulary(tmp_path):
    model, tok = _model(family="mistral", sliding_window=32)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    export_gguf(model, _tokenizer_folder(tmp_path, tok), tmp_path / "m.gguf")
    reader, _ = _read(tmp_path / "m.gguf")
    c = model.config
    expect = {
        "general.architecture": "llama", "llama.context_length": c.max_position_embeddings,
        "llama.embedding_length": c.hidden_size, "llama.block_count": c.num_hidden_layers,
        "llama.feed_forward_length": c.intermediate_size, "llama.attention.head_count": c.num_attention_heads,
        "llama.attention.head_count_kv": c.num_key_value_heads, "llama.rope.dimension_count": c.hidden_size // 4,
        "llama.attention.sliding_window": 32, "llama.vocab_size": c.vocab_size, "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.eos_token_id": tok.eos_token_id,
        "tokenizer.ggml.bos_token_id": tok.bos_token_id, "tokenizer.chat_template": tok.chat_template,
    }
    for key, value in expect.items():
        assert _field(reader, key) == value, key
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(c.rms_norm_eps)
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(c.rope_parameters["rope_theta"])
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert tokens == tok.convert_ids_to_tokens(list(range(len(tok))))
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert _field(reader, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in merges]
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[tok.eos_token_id] == gguf.TokenType.CONTROL and types[5] == gguf.TokenType.NORMAL


def _sentencepiece_llama_tokenizer():
    """A Llama-2-style tokenizer (SentencePiece BPE with byte fallback, '▁' for spaces), trained here."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from slimlm.testing.tiny import TEXT

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *bytes_], show_progress=False)
    tok.train_from_iterator([TEXT] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_sentencepiece_vocabulary_scores_follow_merge_ranks(tmp_path):
    tok = _sentencepiece_llama_tokenizer()
    model = tiny_model("llama", vocab=len(tok))
    export_gguf(model, _tokenizer_folder(tmp_path, tok), tmp_path / "m.gguf")
    reader, _ = _read(tmp_path / "m.gguf")
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.ggml.add_space_prefix") is True
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert tokens == tok.convert_ids_to_tokens(list(range(len(tok))))
    types, scores = _field(reader, "tokenizer.ggml.token_type"), _field(reader, "tokenizer.ggml.scores")
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == gguf.TokenType.CONTROL
    assert types[tokens.index("<0x41>")] == gguf.TokenType.BYTE
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    first, later = ("".join(m if isinstance(m, list) else m.split(" ")) for m in (merges[0], merges[-1]))
    assert scores[tokens.index(first)] > scores[tokens.index(later)]  # earlier merge: higher score


def test_unexpressible_layers_are_refused_or_requantized_with_their_cost(tmp_path):
    model, tok = _model()
    slimlm.quantize(model, "rtn", bits=3, group_size=32)
    folder = _tokenizer_folder(tmp_path, tok)
    with pytest.raises(SlimError, match="int3.*--type"):
        export_gguf(model, folder, tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*m.gguf*"))
    tokens = torch.randint(0, len(tok), (2, 32))
    result = export_gguf(model, folder, tmp_path / "m.gguf", requantize="q8_0", kl_tokens=lambda: tokens)
    assert set(result.requantized.values()) == {"q8_0"} and len(result.requantized) == 14
    assert 0 < result.kl < 0.01  # int3 -> q8_0: the int3 grid is nearly exact on an 8-bit one
    _, tensors = _read(tmp_path / "m.gguf")
    layer = model.model.layers[0].mlp.up_proj
    got = _values(tensors["blk.0.ffn_up.weight"])
    want = layer.dequantize(torch.float32).numpy()
    assert np.abs(got - want).max() <= np.abs(want).max() / 127  # within one q8_0 step


def test_rows_that_do_not_fit_32_blocks_are_refused_or_written_as_f16(tmp_path):
    model, tok = _model(intermediate_size=80)  # down_proj has 80 input columns (stories260K has 172)
    slimlm.quantize(model, "rtn", bits=4, group_size=32, symmetric=True)
    folder = _tokenizer_folder(tmp_path, tok)
    with pytest.raises(SlimError, match="down_proj.*80 input columns are not a multiple"):
        export_gguf(model, folder, tmp_path / "m.gguf")
    result = export_gguf(model, folder, tmp_path / "m.gguf", requantize="q4_0")
    assert set(result.requantized) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert set(result.requantized.values()) == {"f16"} and len(result.copied) == 12
    _, tensors = _read(tmp_path / "m.gguf")
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "F16"
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == "Q4_0"


@pytest.mark.parametrize("family", ["phi3", "gpt2"])
def test_fused_projections_of_phi3_and_gpt2(tmp_path, family):
    model, tok = _model(family=family)
    slimlm.quantize(model, "rtn", bits=4, group_size=32, symmetric=True, include=["*.mlp.*"])
    export_gguf(model, _tokenizer_folder(tmp_path, tok), tmp_path / "m.gguf")
    reader, tensors = _read(tmp_path / "m.gguf")
    assert _field(reader, "general.architecture") == family
    if family == "phi3":
        attn, up = model.model.layers[0].self_attn.qkv_proj.weight, model.model.layers[0].mlp.gate_up_proj
        want_attn = attn.detach().numpy()
    else:  # GPT-2's Conv1D stores (in, out): the file holds (out, in)
        attn, up = model.transformer.h[0].attn.c_attn.weight, model.transformer.h[0].mlp.c_fc
        want_attn = attn.detach().t().numpy()
        assert _field(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(model.config.layer_norm_epsilon)
        np.testing.assert_array_equal(_values(tensors["position_embd.weight"]), model.transformer.wpe.weight.detach().numpy())
    np.testing.assert_array_equal(_values(tensors["blk.0.attn_qkv.weight"]), want_attn)
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == "Q4_0"
    np.testing.assert_array_equal(_values(tensors["blk.0.ffn_up.weight"]), up.dequantize(torch.float32).numpy())


def test_unsupported_architecture_and_existing_output(tmp_path):
    model, tok = _model(family="opt")
    with pytest.raises(SlimError, match="not 'opt'.*--format hf"):
        export_gguf(model, _tokenizer_folder(tmp_path, tok), tmp_path / "m.gguf")
    model, tok = _model()
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep")
    with pytest.raises(SlimError, match="already exists.*--overwrite"):
        export_gguf(model, _tokenizer_folder(tmp_path, tok), out)
    assert out.read_bytes() == b"keep"


def test_a_failure_mid_write_leaves_no_file(tmp_path, monkeypatch):
    model, tok = _model()
    folder = _tokenizer_folder(tmp_path, tok)

    def broken(self, tensor, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", broken)
    with pytest.raises(OSError):
        export_gguf(model, folder, tmp_path / "m.gguf")
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]


def test_pruned_models(tmp_path):
    model, tok = _model()
    slimlm.prune(model, "magnitude", sparsity=0.5)  # unstructured: written dense, zeros kept
    export_gguf(model, _tokenizer_folder(tmp_path, tok), tmp_path / "u.gguf")
    _, tensors = _read(tmp_path / "u.gguf")
    np.testing.assert_array_equal(_values(tensors["blk.0.ffn_down.weight"]), model.model.layers[0].mlp.down_proj.weight.detach().numpy())
    model, tok = _model()
    slimlm.prune(model, "channels", sparsity=0.25)  # structured, uniform: smaller shapes llama.cpp loads
    export_gguf(model, _tokenizer_folder(tmp_path, tok), tmp_path / "s.gguf")
    reader, tensors = _read(tmp_path / "s.gguf")
    assert _field(reader, "llama.feed_forward_length") == model.config.intermediate_size < 128
    assert tuple(tensors["blk.0.ffn_up.weight"].shape) == (64, model.config.intermediate_size)  # GGUF: (cols, rows)


def test_a_tokenizer_gguf_cannot_express_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from slimlm.testing.tiny import TEXT

    raw = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator([TEXT], trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]"], show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    model = tiny_model("llama", vocab=len(tok))
    with pytest.raises(SlimError, match="WordPiece.*--format hf"):
        export_gguf(model, _tokenizer_folder(tmp_path, tok), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_per_layer_sizes_are_refused(tmp_path):
    model, tok = _model()
    model.config.slimlm_module_shapes = {"version": 1, "layers": {"model.layers.0.mlp.up_proj": [100, 64]}}
    with pytest.raises(SlimError, match="different sizes per layer.*--format hf"):
        export_gguf(model, _tokenizer_folder(tmp_path, tok), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
