"""Speculative decoding: greedy output equals plain greedy decoding for every draft; sampling keeps
the target's distribution (the acceptance rule checked statistically on small vocabularies)."""

import pytest
import torch

from slimlm.core.errors import SlimError
from slimlm.engine import speculative as spec
from slimlm.engine.engine import Engine
from slimlm.engine.generate import generate_ids
from slimlm.engine.sampling import SamplingParams, sampling_probs
from slimlm.testing import tiny_model

PROMPT = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 9, 5, 6, 11]])


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", vocab=320, layers=2)


@pytest.mark.parametrize("draft", ["ngram", "small", "oracle", "wrong"])
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_speculative_output_is_plain_greedy_output(target, draft, k):
    """Whatever the draft proposes, greedy speculative decoding emits exactly the plain greedy tokens;
    an oracle draft (the target itself) is always accepted, k + 1 tokens per target step."""
    drafts = {"ngram": "ngram", "small": tiny_model("llama", vocab=320, layers=1, seed=3), "oracle": target,
              "wrong": spec.NgramDraft(max_n=1)}
    params = SamplingParams(max_new_tokens=23)
    want = generate_ids(target, PROMPT, params, engine=True)
    got, stats = spec.generate(target, PROMPT, params, drafts[draft], k=k)
    assert torch.equal(got, want)
    assert stats.emitted == 23 and 0 <= stats.accepted <= stats.proposed
    if draft == "oracle":
        assert stats.acceptance == 1.0 and stats.tokens_per_step > k  # the last step may be cut by the limit


def test_stop_tokens_and_the_limit_end_speculative_generation_like_plain(target):
    plain = generate_ids(target, PROMPT, SamplingParams(max_new_tokens=40), engine=True)[0].tolist()
    stop = plain[7]  # a token the greedy continuation reaches
    params = SamplingParams(max_new_tokens=40, stop_ids=(stop,))
    want = generate_ids(target, PROMPT, params, engine=True)[0].tolist()
    got, _ = spec.generate(target, PROMPT, params, target, k=4)
    assert got[0].tolist() == want[:want.index(stop) + 1]


def tv(counts: torch.Tensor, p: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - p).abs().sum())


def noise(p: torch.Tensor, n: float) -> float:
    """Expected total variation of n samples of p from p (normal approximation)."""
    return 0.5 * float((p * (1 - p) / n).sqrt().sum()) * (2 / torch.pi) ** 0.5


@pytest.mark.parametrize("deterministic_draft", [False, True])
def test_sampled_tokens_keep_the_targets_distribution(deterministic_draft):
    """Leviathan et al.'s rule: the first emitted token is distributed as the target's p at its
    position, and once the first draft token is kept, the second as p at the next position, whatever
    the draft's q (a point mass for prompt lookup). 20,000 trials over 8 tokens: total variation
    within three times its expected sampling noise, while the draft's own q is far from p."""
    gen = torch.Generator().manual_seed(0)
    vocab, trials = 8, 20000
    target_logits = torch.randn(3, vocab, generator=gen) * 1.5
    draft_logits = torch.randn(2, vocab, generator=gen) * 1.5
    params = SamplingParams(temperature=0.8, top_k=6)
    p = sampling_probs(target_logits, params.temperature, params.top_k, params.top_p)
    q = sampling_probs(draft_logits, params.temperature, params.top_k, params.top_p)
    first, second = torch.zeros(vocab), torch.zeros(vocab)
    fixed = [int(q[0].argmax()), int(q[1].argmax())]
    for _ in range(trials):
        proposal = fixed if deterministic_draft else [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(2)]
        tokens, kept = spec.accept(target_logits, proposal, None if deterministic_draft else q, params, gen)
        first[tokens[0]] += 1
        if kept >= 1:
            second[tokens[1]] += 1
    assert tv(first, p[0]) < 3 * noise(p[0], first.sum())
    assert second.sum() > 500 and tv(second, p[1]) < 3 * noise(p[1], second.sum())
    assert 0.5 * float((q[0] - p[0]).abs().sum()) > 0.2  # the check would notice the draft's distribution


def test_sampled_speculative_generation_is_reproducible_and_valid(target):
    params = SamplingParams(max_new_tokens=20, temperature=0.9, top_p=0.95, seed=7)
    a, _ = spec.generate(target, PROMPT, params, tiny_model("llama", vocab=320, layers=1, seed=3), k=3)
    b, _ = spec.generate(target, PROMPT, params, tiny_model("llama", vocab=320, layers=1, seed=3), k=3)
    assert torch.equal(a, b) and a.shape == (1, 20) and int(a.max()) < 320


def test_truncate_forgets_rejected_tokens(target):
    engine, alone = Engine(target, slots=1, max_len=64), Engine(target, slots=1, max_len=64)
    engine.prefill(0, torch.tensor([1, 2, 3]))
    engine.append(0, torch.tensor([4, 5, 6]), read_back=True)
    engine.truncate(0, 4)  # keep 1 2 3 4
    got = engine.append(0, torch.tensor([9]), read_back=True)
    want = alone.prefill(0, torch.tensor([1, 2, 3, 4, 9]))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(SlimError, match="cannot keep"):
        engine.truncate(0, 99)


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    draft = spec.NgramDraft(max_n=3)
    assert draft.propose([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 2, SamplingParams())[0] == [7, 8]
    assert draft.propose([1, 2, 3, 4], 2, SamplingParams())[0] == []
    with pytest.raises(SlimError, match="one prompt"):
        spec.generate(tiny_model("llama", vocab=320), PROMPT.repeat(2, 1), SamplingParams(), "ngram",
                      on_tokens=print)


@pytest.mark.parametrize("draft", ["ngram", "small", "oracle"])
def test_a_batch_of_prompts_is_verified_together_with_plain_greedy_output(target, draft):
    """Three prompts speculate together (one `Engine.extend` forward per step, the model draft a slot
    per prompt): each row is its plain greedy output, and the oracle is always accepted."""
    drafts = {"ngram": "ngram", "small": tiny_model("llama", vocab=320, layers=1, seed=3), "oracle": target}
    prompts = torch.cat([PROMPT, torch.randint(1, 300, (2, PROMPT.shape[1]), generator=torch.Generator().manual_seed(4))])
    params = SamplingParams(max_new_tokens=17)
    want = generate_ids(target, prompts, params, engine=True)
    got, stats = spec.generate(target, prompts, params, drafts[draft], k=3)
    assert torch.equal(got, want) and stats.emitted == 3 * 17
    if draft == "oracle":
        assert stats.acceptance == 1.0 and stats.target_steps <= 6  # 1 + ceil(16 / 4) steps, prefill aside
