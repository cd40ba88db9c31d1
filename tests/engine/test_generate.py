import pytest
import torch

import slimlm
from slimlm.engine.generate import SamplingParams, generate_ids
from slimlm.engine.sampling import sample_next
from slimlm.testing import FAMILIES, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers_generate(family):
    model = tiny_model(family)
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    ours = generate_ids(model, ids, SamplingParams(max_new_tokens=12))
    theirs = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0, eos_token_id=None)
    assert ours.tolist() == theirs[:, 5:].tolist()


def test_quantized_model_generates_and_batches_match_single():
    model = slimlm.quantize(tiny_model("llama"), "rtn", bits=4, group_size=32)
    a, b = torch.tensor([[3, 4, 5, 6]]), torch.tensor([[9, 8, 7, 6]])
    both = generate_ids(model, torch.cat([a, b]), SamplingParams(max_new_tokens=6))
    assert both[0].tolist() == generate_ids(model, a, SamplingParams(max_new_tokens=6))[0].tolist()
    assert both[1].tolist() == generate_ids(model, b, SamplingParams(max_new_tokens=6))[0].tolist()


def test_seeded_sampling_is_reproducible_and_topk1_is_greedy():
    model = tiny_model("qwen2")
    ids = torch.tensor([[1, 2, 3]])
    p = SamplingParams(max_new_tokens=8, temperature=1.0, seed=7)
    assert generate_ids(model, ids, p).tolist() == generate_ids(model, ids, p).tolist()
    k1 = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=1, seed=3)
    assert generate_ids(model, ids, k1).tolist() == generate_ids(model, ids, SamplingParams(max_new_tokens=8)).tolist()


def test_top_p_keeps_the_smallest_prefix():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, top_p=0.7, generator=g).item() for _ in range(200)}
    assert draws == {0, 1}


def test_stop_ids_end_generation():
    model = tiny_model("llama")
    ids = torch.tensor([[1, 2, 3]])
    free = generate_ids(model, ids, SamplingParams(max_new_tokens=6))
    stop = int(free[0, 2])
    out = generate_ids(model, ids, SamplingParams(max_new_tokens=6, stop_ids=(stop,)))
    assert out.shape[1] <= 3 and out[0, -1].item() == stop


def test_generate_text_streams_the_same_text(tiny_folder):
    model, tok = slimlm.load(tiny_folder("llama"))
    pieces = []
    text = slimlm.generate(model, tok, "Once upon", max_new_tokens=10, on_text=pieces.append)
    assert "".join(pieces) == text
