import pytest
import torch

import slimlm
from slimlm.core.errors import SlimError
from slimlm.engine.torch_ops import attention_mask
from slimlm.engine.engine import Engine
from slimlm.engine.generate import SamplingParams, generate_ids
from slimlm.engine.kv_cache import KVCache, quantize_heads
from slimlm.testing import tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "phi3", "qwen3"]


def model_for(family, **overrides):
    if family != "qwen3":
        return tiny_model(family, **overrides)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         **overrides)
    return Qwen3ForCausalLM(config).eval()


def ids(n, seed=0):
    return torch.randint(1, 300, (n,), generator=torch.Generator().manual_seed(seed))


def teacher_forced(engine, slot, prompt, continuation):
    """Engine logits (T, V) for every position of prompt + continuation."""
    out = [engine.prefill(slot, prompt)]
    for token in continuation[:-1]:
        out.append(engine.decode(torch.tensor([slot]), token[None])[0])
    return torch.stack(out)


def assert_matches_forward(model, engine, prompt, continuation, tol=1e-4, slot=0):
    """The engine's teacher-forced logits equal the model's own forward over the same tokens."""
    got = teacher_forced(engine, slot, prompt, continuation)
    with torch.no_grad():
        expected = model(torch.cat([prompt, continuation])[None]).logits[0, len(prompt) - 1 : -1]
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_logits_equal_the_models_own_forward(family):
    model = model_for(family)
    assert_matches_forward(model, Engine(model, slots=2, max_len=64), ids(7), ids(9, seed=1), slot=1)


def test_greedy_output_equals_transformers_generate_on_the_demo_model():
    model, tok = slimlm.load("demo")
    prompt = tok("The for statement", return_tensors="pt")["input_ids"]
    ours = generate_ids(model, prompt, SamplingParams(max_new_tokens=40), engine=True)
    theirs = model.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours[0], theirs[0, prompt.shape[1]:])


def test_sequences_of_different_lengths_decode_together():
    """A batch of three prompts of different lengths gives each the tokens it gets alone."""
    model = model_for("qwen2")
    prompts = [ids(3, 1), ids(11, 2), ids(6, 3)]
    engine = Engine(model, slots=3, max_len=64)
    logits = torch.stack([engine.prefill(i, p) for i, p in enumerate(prompts)])
    together = []
    for _ in range(8):
        tokens = logits.argmax(-1)
        together.append(tokens)
        logits = engine.decode(torch.arange(3), tokens)
    together = torch.stack(together, 1)
    for i, p in enumerate(prompts):
        alone = generate_ids(model, p[None], SamplingParams(max_new_tokens=8), engine=False)
        assert torch.equal(together[i], alone[0])


def test_slots_can_be_any_subset_and_reused():
    model = model_for("llama")
    engine = Engine(model, slots=4, max_len=64)
    a, b = ids(5, 1), ids(9, 2)
    la, lb = engine.prefill(3, a), engine.prefill(1, b)
    out = engine.decode(torch.tensor([3, 1]), torch.stack([la.argmax(), lb.argmax()]))
    with torch.no_grad():
        ref_a = model(torch.cat([a, la.argmax()[None]])[None]).logits[0, -1]
    torch.testing.assert_close(out[0], ref_a, rtol=1e-4, atol=1e-4)
    engine.release(3)
    again = engine.prefill(3, b)  # a finished slot takes a new sequence
    torch.testing.assert_close(again, lb, rtol=1e-5, atol=1e-5)


def test_sliding_window_matches_mistral():
    model = model_for("mistral", sliding_window=4)
    assert_matches_forward(model, Engine(model, max_len=32), ids(6), ids(8, seed=4))


def test_attention_mask():
    mask = attention_mask(torch.tensor([[2], [4]]), 5, window=2)[:, 0, 0]
    assert mask.tolist() == [[False, True, True, False, False], [False, False, False, True, True]]


def test_int8_kv_cache_is_close_and_smaller():
    model = model_for("llama")
    prompt, continuation = ids(6), ids(20, seed=5)
    exact = teacher_forced(Engine(model, max_len=64), 0, prompt, continuation)
    int8_engine = Engine(model, max_len=64, kv_dtype="int8")
    approx = teacher_forced(int8_engine, 0, prompt, continuation)
    kl = torch.nn.functional.kl_div(approx.log_softmax(-1), exact.log_softmax(-1), log_target=True, reduction="batchmean")
    assert kl < 1e-3 and not torch.equal(approx, exact)
    fp32_bytes = Engine(model, max_len=64).cache.nbytes()
    assert int8_engine.cache.nbytes() < 0.3 * fp32_bytes


def test_kv_quantization_round_trip():
    x = torch.randn(2, 3, 5, 16)
    codes, scale = quantize_heads(x)
    assert codes.dtype == torch.int8 and ((codes.float() * scale.float() - x).abs() <= scale.float() / 2 + 1e-6).all()
    cache = KVCache(1, 3, 4, 3, 16, 8, torch.float32, quantized=True)  # 3 blocks of 4 tokens
    table = torch.tensor([[2, 1]])  # positions 0-3 in block 2, 4-7 in block 1
    cache.write(0, table, torch.arange(5)[None], x[:1], x[:1])
    k, v = cache.read(0, table, 5)
    assert (k - x[:1]).abs().max() <= scale.float().max() / 2 + 1e-6
    assert cache.k[0][1, :, 1:].abs().sum() == 0 and cache.k[0][2].abs().sum() > 0


def test_quantized_models_run_on_the_engine():
    model = slimlm.quantize(model_for("llama"), "rtn", bits=4, group_size=32)
    assert_matches_forward(model, Engine(model, max_len=32), ids(5), ids(6, seed=6), tol=1e-3)


def test_unsupported_models_fall_back_and_limits_are_checked():
    gpt2 = tiny_model("gpt2")
    assert not Engine.supports(gpt2)
    with pytest.raises(SlimError, match="cannot run this model"):
        Engine(gpt2)
    out = generate_ids(gpt2, ids(4)[None], SamplingParams(max_new_tokens=3))  # the model's own forward
    assert out.shape == (1, 3)
    engine = Engine(model_for("llama"), max_len=8)
    with pytest.raises(SlimError, match="holds 8"):
        engine.prefill(0, ids(9))
    with pytest.raises(SlimError, match="kv cache dtype"):
        Engine(model_for("llama"), kv_dtype="int4")


def test_chunked_prefill_equals_one_prefill():
    model = model_for("qwen3")
    prompt = ids(12)
    engine = Engine(model, slots=2, max_len=32)
    whole = engine.prefill(0, prompt)
    engine.append(1, prompt[:5])
    chunks = engine.append(1, prompt[5:], all_logits=True)
    torch.testing.assert_close(chunks[-1], whole, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        expected = model(prompt[None]).logits[0, 5:]
    torch.testing.assert_close(chunks, expected, rtol=1e-4, atol=1e-4)


def test_fusion_is_chosen_once_when_the_engine_is_built():
    """Float q/k/v run one call each; int4 layers sharing a kernel run through its run_many; Phi-3's
    fused projections are split. The choice is in the plan, not probed per call."""
    from slimlm.engine.decoder import KernelProjection, SeparateProjection, SplitProjection

    plan = Engine(model_for("llama"), slots=1, max_len=16).plan
    assert all(isinstance(layer.qkv, SeparateProjection) for layer in plan.layers)
    model = model_for("llama").to(torch.bfloat16)
    slimlm.quantize(model, "rtn", bits=4, group_size=32)
    plan = Engine(model, slots=1, max_len=16).plan
    assert all(isinstance(layer.qkv, KernelProjection) and isinstance(layer.gate_up, KernelProjection)
               for layer in plan.layers)
    assert isinstance(Engine(model_for("phi3"), slots=1, max_len=16).plan.layers[0].qkv, SplitProjection)


@pytest.mark.parametrize("fused", [False, None])
def test_the_cache_checks_its_bounds_on_the_host(fused):
    engine = Engine(model_for("llama"), slots=2, max_len=8, fused_step=fused)
    logits = engine.prefill(1, ids(6))
    engine.decode(torch.tensor([1]), logits.argmax(-1)[None])  # position 6
    engine.decode(torch.tensor([1]), logits.argmax(-1)[None])  # position 7, the last
    with pytest.raises(SlimError, match="longer than the KV cache"):
        engine.decode(torch.tensor([1]), logits.argmax(-1)[None])
    assert int(engine.lengths[1]) == 8  # the refused step changed nothing
    with pytest.raises(SlimError, match="slots must be an integer >= 1"):
        Engine(model_for("llama"), slots=0)


def test_the_all_reduce_hook_sees_every_row_parallel_output():
    """DecoderPlan.reduce is the one place tensor parallelism sums partial outputs: it is called on
    o_proj's and down_proj's output of every layer, for prefill and decode alike."""
    model = model_for("llama")
    engine = Engine(model, slots=1, max_len=16, fused_step=False)
    seen = []
    engine.plan.reduce = lambda x: seen.append(x.shape) or x
    logits = engine.prefill(0, ids(5))
    engine.decode(torch.tensor([0]), logits.argmax(-1)[None])
    assert len(seen) == 2 * 2 * len(model.model.layers)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("mode", ["fused", "torch", "static", "int8-kv"])
def test_any_schedule_of_slots_gives_each_sequence_its_own_logits(mode, paged):
    """Sequences start, decode in arbitrary subsets and finish in any order (as the server's continuous
    batching does), and every step's logits equal that sequence run alone on the contiguous layout (one
    block of max_len tokens per sequence). paged: blocks of 4 tokens with prefix caching, and prompts
    that often start with an earlier sequence's tokens start from its cached blocks. "static" is the
    bucketed fixed-shape step that CUDA graphs capture, run eagerly."""
    model = model_for("mistral", sliding_window=6)
    settings = {"fused": {}, "torch": {"fused_step": False}, "static": {"static_steps": True},
                "int8-kv": {"kv_dtype": "int8"}}[mode]
    layout = {"block_size": 4, "prefix_caching": True} if paged else {"block_size": 40}
    engine = Engine(model, slots=5, max_len=40, **settings, **layout)
    assert engine.decode_ops == {"int8-kv": engine.decode_ops}.get(mode, mode)
    gen = torch.Generator().manual_seed(0)
    history: dict[int, list[int]] = {}  # slot -> tokens fed so far
    alone: dict[int, Engine] = {}  # slot -> its sequence run alone, step by step
    earlier: list[list[int]] = []  # every sequence's tokens, for prompts that share a prefix
    reused = 0
    tol = 2e-3 if mode == "int8-kv" else 1e-4  # int8: a last-bit difference between batched and alone can flip a code
    for step in range(60):
        free = [s for s in range(5) if s not in history]
        if free and (not history or torch.rand((), generator=gen) < 0.3):
            slot = free[int(torch.randint(len(free), (), generator=gen))]
            prompt = torch.randint(1, 300, (int(torch.randint(2, 8, (), generator=gen)),), generator=gen)
            if earlier and torch.rand((), generator=gen) < 0.5:
                source = earlier[int(torch.randint(len(earlier), (), generator=gen))]
                cut = int(torch.randint(1, len(source) + 1, (), generator=gen))
                prompt = torch.cat([torch.tensor(source[:cut]), prompt])[:30]
            n = engine.reuse_prefix(slot, prompt.tolist())
            reused += n
            got = engine.append(slot, prompt[n:], read_back=n > 0)
            history[slot] = prompt.tolist()
            earlier.append(history[slot])
            alone[slot] = Engine(model, slots=1, max_len=40, fused_step=False, kv_dtype=settings.get("kv_dtype", "auto"),
                                 block_size=40)
            torch.testing.assert_close(got, alone[slot].prefill(0, prompt), rtol=tol, atol=tol)
        done = [s for s, t in history.items() if len(t) >= 38 or torch.rand((), generator=gen) < 0.08]
        for slot in done:
            engine.release(slot)
            del history[slot]
        live = sorted(history)
        if not live:
            continue
        chosen = [s for s in live if torch.rand((), generator=gen) < 0.7] or live[:1]
        order = torch.randperm(len(chosen), generator=gen).tolist()
        slots = torch.tensor([chosen[i] for i in order])
        tokens = torch.randint(1, 300, (len(slots),), generator=gen)
        got = engine.decode(slots, tokens)
        for i, slot in enumerate(slots.tolist()):
            history[slot].append(int(tokens[i]))
            want = alone[slot].decode(torch.tensor([0]), tokens[i:i + 1])[0]
            torch.testing.assert_close(got[i], want, rtol=tol, atol=tol)
        held = sorted(int(engine.row_of[s]) for s in history)
        assert held == list(range(len(history)))  # the sequences occupy rows 0..n-1
    assert (reused > 0) == paged
    for slot in list(history):
        engine.release(slot)
    assert engine.pool.available() == engine.cache.blocks - 1 and not any(engine.pool.refs)  # no block leaks
    if mode == "static":
        assert set(engine._graphs) <= {1, 2, 4, 5} and len(engine._graphs) >= 2


def greedy(engine, slot, prompt, steps, reuse=True):
    """Greedy tokens and logits from `prompt` on `slot` (starting from cached blocks when `reuse`)."""
    n = engine.reuse_prefix(slot, prompt.tolist()) if reuse else 0
    logits = engine.append(slot, prompt[n:], read_back=n > 0)
    out, seen = [], [logits]
    for _ in range(steps):
        out.append(int(logits.argmax()))
        logits = engine.decode(torch.tensor([slot]), torch.tensor(out[-1:]))[0]
        seen.append(logits)
    return out, torch.stack(seen)


@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_prefix_caching_reuses_blocks_and_changes_no_output(kv_dtype):
    """A request whose prompt starts with a finished one's tokens (prompt and generated) starts from its
    cached blocks: same greedy tokens and logits as without the cache; a different first token shares
    nothing (digests chain the whole prefix). An int8 cache is not bit-equal: a prompt prefilled at once
    attends to its own keys unquantized, the cached tokens were computed against quantized ones."""
    model = model_for("llama")
    cached = Engine(model, slots=2, max_len=64, block_size=4, prefix_caching=True, kv_dtype=kv_dtype)
    plain = Engine(model, slots=2, max_len=64, block_size=4, kv_dtype=kv_dtype)
    system = ids(13, seed=3)
    first, _ = greedy(cached, 0, system, 6)
    cached.release(0)
    follow_up = torch.cat([system, torch.tensor(first), ids(5, seed=4)])  # a chat's next turn
    got, got_logits = greedy(cached, 1, follow_up, 8)
    want, want_logits = greedy(plain, 1, follow_up, 8, reuse=False)
    assert cached.cached_tokens == 16 and got == want  # 19 tokens were cached: 4 whole blocks
    tol = 2e-2 if kv_dtype == "int8" else 1e-4
    torch.testing.assert_close(got_logits, want_logits, rtol=tol, atol=tol)
    other = follow_up.clone()
    other[0] = (other[0] + 1) % 300
    assert cached.reuse_prefix(0, other.tolist()) == 0
    assert cached.reuse_prefix(0, system[:4].tolist()) == 0  # the last prompt token is always computed
    assert cached.reuse_prefix(0, system[:5].tolist()) == 4


def test_prefix_cache_evicts_least_recently_used_blocks_last_block_first():
    model = model_for("llama")
    engine = Engine(model, slots=1, max_len=64, block_size=4, kv_tokens=24, prefix_caching=True)  # 6 blocks
    a, b = ids(9, seed=1), ids(9, seed=2)
    engine.prefill(0, a)  # blocks for 0-3, 4-7 cached, 8 in a third
    engine.release(0)
    engine.prefill(0, b)  # takes the 3 free blocks
    engine.release(0)
    assert engine.pool.available() == 6 and len(engine.pool.idle) == 4
    assert engine.reuse_prefix(0, a.tolist()) == 8  # a's blocks are the most recently used now
    engine.append(0, a[8:], read_back=True)
    engine.release(0)
    engine.prefill(0, ids(13, seed=5))  # needs 4 blocks: 2 free, then b's blocks, its last block first
    assert engine.pool.evicted == 2
    engine.release(0)
    assert engine.reuse_prefix(0, b.tolist()) == 0 and engine.reuse_prefix(0, a.tolist()) == 8


def test_truncating_into_a_shared_block_copies_it():
    """Speculative decoding's rollback inside a block another sequence holds writes into a copy."""
    model = model_for("llama")
    engine = Engine(model, slots=2, max_len=64, block_size=4, prefix_caching=True)
    oracle = Engine(model, slots=1, max_len=64, block_size=64)
    prompt = ids(9, seed=7)
    engine.prefill(0, prompt)
    assert engine.reuse_prefix(1, prompt.tolist()) == 8  # slot 1 holds slot 0's first two blocks
    engine.truncate(1, 6)  # back into the second (shared) block
    assert engine.blocks[1][0] == engine.blocks[0][0] and engine.blocks[1][1] != engine.blocks[0][1]
    got = engine.append(1, ids(3, seed=8), read_back=True)
    want = oracle.append(0, torch.cat([prompt[:6], ids(3, seed=8)]))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(engine.decode(torch.tensor([0]), torch.tensor([5]))[0],
                               oracle.prefill(0, torch.cat([prompt, torch.tensor([5])])), rtol=1e-4, atol=1e-4)


def test_a_full_cache_refuses_whole_steps_and_memory_follows_the_tokens():
    """kv_tokens bounds the tokens held in all, not per sequence: 64 tokens hold eight sequences of 8
    (two blocks each), where a contiguous cache of the same size holds one sequence of max_len 64."""
    from slimlm.engine.kv_cache import CacheFull

    model = model_for("llama")
    engine = Engine(model, slots=10, max_len=64, block_size=4, kv_tokens=64)
    for slot in range(8):
        engine.prefill(slot, ids(7, seed=slot))  # 7 tokens: two blocks each
    assert engine.pool.available() == 0 and engine.capacity == 64
    with pytest.raises(CacheFull, match="full"):
        engine.prefill(8, ids(3))
    lengths, tables = engine.lengths.clone(), engine.tables.clone()
    engine.decode(torch.arange(8), torch.arange(8))  # position 7: inside the second block
    with pytest.raises(CacheFull):
        engine.decode(torch.arange(8), torch.arange(8))  # position 8 needs a third block each
    assert torch.equal(engine.lengths, lengths + torch.tensor([1] * 8 + [0, 0]))  # the refused step changed nothing
    assert torch.equal(engine.tables, tables)
    engine.release(3)
    engine.decode(torch.tensor([0, 1]), torch.tensor([1, 2]))  # two freed blocks: two sequences grow


@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_extend_scores_several_tokens_of_several_sequences_in_one_forward(kv_dtype):
    """Batched speculative verification: rows of different lengths each fed 4 tokens give the logits of
    feeding them one at a time; truncating back and decoding on gives the solo logits again."""
    model = model_for("mistral", sliding_window=6)
    engine = Engine(model, slots=3, max_len=64, block_size=4, kv_dtype=kv_dtype)
    tol = 2e-3 if kv_dtype == "int8" else 1e-4
    prompts = [ids(5, seed=1), ids(11, seed=2), ids(8, seed=3)]
    alone = [Engine(model, slots=1, max_len=64, block_size=64, kv_dtype=kv_dtype) for _ in prompts]
    for slot, p in enumerate(prompts):
        engine.prefill(slot, p)
        alone[slot].prefill(0, p)
    fed = torch.randint(1, 300, (2, 4), generator=torch.Generator().manual_seed(9))
    got = engine.extend(torch.tensor([2, 0]), fed)  # (2, 4, V)
    for row, slot in enumerate([2, 0]):
        want = [alone[slot].decode(torch.tensor([0]), fed[row, i:i + 1])[0] for i in range(4)]
        torch.testing.assert_close(got[row], torch.stack(want), rtol=tol, atol=tol)
    engine.truncate(2, 8 + 1)  # kept 1 of the 4
    alone[2].truncate(0, 8 + 1)
    step = engine.decode(torch.tensor([2, 1]), torch.tensor([7, 7]))
    torch.testing.assert_close(step[0], alone[2].decode(torch.tensor([0]), torch.tensor([7]))[0], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_steps_of_prefills_and_decodes_give_each_sequence_its_own_logits(dtype):
    """`Engine.step`: new prompts (or the part not in the prefix cache) ride along the decode step as
    rows of their own, several per sequence; every sequence's last-row logits equal the sequence run
    alone on the contiguous layout, prompts spanning blocks of 4 and sharing cached prefixes."""
    model = model_for("mistral", sliding_window=6).to(dtype)
    engine = Engine(model, slots=5, max_len=40, block_size=4, prefix_caching=True)
    assert engine.can_mix
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    gen = torch.Generator().manual_seed(1)
    history, alone, earlier, mixed = {}, {}, [], 0
    for _ in range(50):
        feeds = {}
        free = [s for s in range(5) if s not in history]
        for slot in free[:int(torch.randint(0, 3, (), generator=gen))]:  # up to two new prompts this step
            prompt = torch.randint(1, 300, (int(torch.randint(2, 9, (), generator=gen)),), generator=gen).tolist()
            if earlier and torch.rand((), generator=gen) < 0.5:
                source = earlier[int(torch.randint(len(earlier), (), generator=gen))]
                prompt = (source[:int(torch.randint(1, len(source) + 1, (), generator=gen))] + prompt)[:30]
            n = engine.reuse_prefix(slot, prompt)
            history[slot], feeds[slot] = prompt, prompt[n:]
            earlier.append(prompt)
            alone[slot] = Engine(model, slots=1, max_len=40, fused_step=False, block_size=40)
        for slot in [s for s in history if s not in feeds]:
            if len(history[slot]) >= 38 or torch.rand((), generator=gen) < 0.08:
                engine.release(slot)
                del history[slot]
            elif torch.rand((), generator=gen) < 0.7:
                feeds[slot] = [int(torch.randint(1, 300, (), generator=gen))]
        if not feeds:
            continue
        slots = list(feeds)
        mixed += any(len(f) > 1 for f in feeds.values()) and any(len(f) == 1 for f in feeds.values())
        got = engine.step(slots, [feeds[s] for s in slots])
        for i, slot in enumerate(slots):
            if len(alone[slot].tokens[0]) == 0 and int(alone[slot].lengths[0]) == 0:
                want = alone[slot].prefill(0, torch.tensor(history[slot]))
            else:
                history[slot] += feeds[slot]
                want = alone[slot].decode(torch.tensor([0]), torch.tensor(feeds[slot]))[0]
            torch.testing.assert_close(got[i].float(), want.float(), rtol=tol, atol=tol)
        assert sorted(int(engine.row_of[s]) for s in history) == list(range(len(history)))
    assert mixed >= 5
    for slot in list(history):
        engine.release(slot)
    assert engine.pool.available() == engine.cache.blocks - 1 and not any(engine.pool.refs)


def test_a_mixed_step_refuses_what_it_cannot_run():
    model = model_for("llama")
    engine = Engine(model, slots=2, max_len=16, block_size=4)
    with pytest.raises(SlimError, match="distinct slots"):
        engine.step([0, 0], [[1], [2]])
    with pytest.raises(SlimError, match="holds 16"):
        engine.step([0], [list(range(1, 17))])
    assert not Engine(model, slots=2, max_len=16, fused_step=False).can_mix
    with pytest.raises(SlimError, match="fused CPU step"):
        Engine(model, slots=2, max_len=16, fused_step=False).step([0], [[1]])
