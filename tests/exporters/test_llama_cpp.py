"""A real llama.cpp (through llama-cpp-python, the `test` extra) loads slimlm's GGUF files and computes
what slimlm computes: the same tokens from the same text, and the same logits to a stated tolerance.

Tolerances: float files agree to float rounding. Quantized files: llama.cpp multiplies Q4/Q8 weights
with activations it rounds to 8 bits (its Q8_0/Q8_1 dot products) where slimlm keeps them in float, so
logits differ by that rounding; the test asks for a KL under 1e-3 nats, logits within 0.2 standard deviations,
and the same greedy token wherever slimlm's top token leads llama.cpp's choice by more than 0.1 (a
random tiny model has many near-ties that 8-bit activations can flip; Q8_0 shows the same error as Q4)."""

from __future__ import annotations

import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

import slimlm  # noqa: E402
from slimlm.eval.metrics import kl_divergence  # noqa: E402
from slimlm.exporters.gguf import export_gguf  # noqa: E402
from slimlm.testing import tiny_model, tiny_tokenizer  # noqa: E402
from slimlm.testing.tiny import TEXT  # noqa: E402


def _llama(path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, logits_all=True, n_threads=1, verbose=False,
                           seed=0)


def _llama_logits(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.tensor(llm.scores[: len(ids)], dtype=torch.float32)


def _export(tmp_path, model, tok, name="m.gguf", **kw):
    folder = tmp_path / "tok"
    tok.save_pretrained(folder)
    export_gguf(model, folder, tmp_path / name, **kw)
    return tmp_path / name


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "phi3", "gpt2"])
def test_float_file_gives_slimlm_logits(tmp_path, family):
    tok = tiny_tokenizer()
    model = tiny_model(family, vocab=len(tok))
    llm = _llama(_export(tmp_path, model, tok))
    ids = tok(TEXT[:200])["input_ids"][:48]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(_llama_logits(llm, ids), want, rtol=0, atol=2e-3)


@pytest.mark.parametrize("settings", [dict(bits=4, group_size=32, symmetric=True), dict(bits=4, group_size=64, symmetric=False),
                                      dict(bits=8, group_size=None, symmetric=True)], ids=["q4_0", "q4_1", "q8_0"])
def test_quantized_file_gives_slimlm_logits(tmp_path, settings):
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab=len(tok), hidden=128, max_position_embeddings=128)
    slimlm.quantize(model, "rtn", **settings)
    llm = _llama(_export(tmp_path, model, tok))
    ids = tok(TEXT)["input_ids"][:64]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0]
    got = _llama_logits(llm, ids)
    assert kl_divergence(want, got).mean() < 1e-3  # measured: 1.2e-4 to 1.6e-4
    assert (got - want).abs().max() < 0.2 * want.std()  # measured: at most 0.09 with a logit std of 0.9
    # greedy tokens: the same wherever slimlm's choice leads by more than activation rounding can move
    ours, theirs = want.argmax(-1), got.argmax(-1)
    lead = (want.gather(1, ours[:, None]) - want.gather(1, theirs[:, None]))[:, 0]
    assert (lead[ours != theirs] < 0.1).all()  # measured: disagreements only at leads under 0.03
    assert (ours == theirs).float().mean() >= 0.85


def test_llama_cpp_tokenizes_like_the_tokenizer(tmp_path):
    from tests.exporters.test_gguf import _sentencepiece_llama_tokenizer

    text = "Once upon a time, a small robot found 3 red apples.\nIt said: \"hello!\""
    for tok in (tiny_tokenizer(), _sentencepiece_llama_tokenizer()):
        model = tiny_model("llama", vocab=len(tok), max_position_embeddings=128)
        llm = _llama(_export(tmp_path, model, tok, name=f"{len(tok)}.gguf"))
        want = tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == want
