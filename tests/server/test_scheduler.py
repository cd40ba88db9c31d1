"""The scheduler alone (no HTTP): one failing sequence fails alone, sampling survives any
temperature, the KV cache empties when idle, impossible settings are refused, shutdown is explicit."""

import time

import pytest
import torch

from slimlm.core.errors import SlimError
from slimlm.engine.sampling import SamplingParams, sample_next
from slimlm.server.scheduler import Request, Scheduler, ShuttingDown
from slimlm.testing import tiny_model

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9], [10, 11], [20, 21, 22, 23], [30]]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", vocab=320)


def run(scheduler, request, timeout=30.0):
    """Submit `request` and wait for it: (generated tokens, finish reason, message)."""
    scheduler.submit(request)
    return drain(request, timeout)


def drain(request, timeout=30.0):
    tokens, deadline = [], time.monotonic() + timeout
    while True:
        event = request.events.get(timeout=max(deadline - time.monotonic(), 0.01))
        if event[0] == "done":
            return tokens, event[1], event[2]
        tokens.append(event[1])


def greedy(n=12, **kw):
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kw)


def test_a_failing_sequence_fails_alone_and_the_others_keep_their_solo_outputs(model):
    sched = Scheduler(model, slots=4, max_len=64)
    try:
        solo = [run(sched, Request(p, greedy()))[0] for p in PROMPTS[:3]]
        poisoned = Request([40, 41, 42], greedy(30))
        decode = sched.engine.decode

        def failing_decode(slots, tokens):  # a step that includes the poisoned sequence raises
            if poisoned.slot is not None and poisoned.slot in slots.tolist():
                raise RuntimeError("boom")
            return decode(slots, tokens)

        sched.engine.decode = failing_decode
        bad_prefill = Request([1, 5000], greedy())  # bypasses submit's check: the engine's lookup fails
        good = [Request(p, greedy()) for p in PROMPTS[:3]]
        for r in [good[0], poisoned, good[1]]:
            sched.submit(r)
        with sched.lock:
            sched.waiting.append(bad_prefill)
        sched.submit(good[2])
        results = [drain(r) for r in good]
        assert [tokens for tokens, _, _ in results] == solo and all(reason == "length" for _, reason, _ in results)
        assert drain(poisoned)[1:] == ("error", "generation failed: RuntimeError: boom")
        assert drain(bad_prefill)[1] == "error"
        assert run(sched, Request(PROMPTS[0], greedy()))[0] == solo[0]  # and the scheduler goes on
    finally:
        sched.close()


def test_sampling_survives_tiny_temperatures_and_bad_logits():
    logits = torch.randn(4, 50)
    assert torch.equal(sample_next(logits, 1e-40), logits.argmax(-1))
    assert torch.equal(sample_next(logits, 5e-324, top_k=3, top_p=0.5), logits.argmax(-1))
    weird = logits.clone()
    weird[0, 3] = float("nan")  # NaN never wins
    weird[1] = float("-inf")  # nothing finite: the argmax
    weird[2, 7] = float("inf")  # +inf: that token
    got = sample_next(weird, 1.0, generator=torch.Generator().manual_seed(0))
    assert got[0] != 3 and got[1] == 0 and got[2] == 7
    assert sample_next(logits, 1e300).shape == (4,)


def test_a_tiny_temperature_is_greedy_in_the_scheduler(model):
    sched = Scheduler(model, slots=2, max_len=64)
    try:
        want = run(sched, Request(PROMPTS[1], greedy()))[0]
        assert run(sched, Request(PROMPTS[1], SamplingParams(12, temperature=1e-40, seed=1)))[0] == want
    finally:
        sched.close()


def test_the_kv_cache_empties_when_requests_end(model):
    sched = Scheduler(model, slots=2, max_len=64)
    try:
        run(sched, Request(PROMPTS[0], greedy(5)))
        r = Request(PROMPTS[1], greedy(40))
        sched.submit(r)
        assert r.events.get(timeout=10)[0] == "token"
        r.cancel()
        assert drain(r)[1] == "cancelled"
        assert sched.stats()["kv_tokens"] == 0 and sched.stats()["running"] == 0
    finally:
        sched.close()


@pytest.mark.parametrize("kwargs, text", [
    ({"slots": 0}, "slots"), ({"max_queue": 0}, "max_queue"), ({"prefill_chunk": 0}, "prefill_chunk"),
    ({"max_len": 1}, "max_len"),
])
def test_impossible_settings_are_refused(model, kwargs, text):
    with pytest.raises(SlimError, match=text):
        Scheduler(model, **kwargs)


def test_prompts_outside_the_vocabulary_are_refused_at_submit(model):
    sched = Scheduler(model, slots=1, max_len=64)
    try:
        for prompt in ([1, 320], [1, -1], [True, False], []):
            with pytest.raises(SlimError):
                sched.submit(Request(prompt, greedy()))
    finally:
        sched.close()


def test_shutdown_fails_waiting_requests_at_once_and_running_ones_after_the_grace(model):
    sched = Scheduler(model, slots=1, max_len=256)
    running, waiting = Request([1, 2], greedy(250)), Request([3, 4], greedy(5))
    sched.submit(running)
    sched.submit(waiting)
    assert running.events.get(timeout=10)[0] == "token"
    decode = sched.engine.decode
    sched.engine.decode = lambda *a: (time.sleep(0.01), decode(*a))[1]  # slow enough to outlast the grace
    t0 = time.monotonic()
    sched.shutdown(grace=0.3)
    assert drain(waiting)[1:] == ("shutdown", "the server is shutting down")
    assert drain(running)[1] == "shutdown" and 0.25 < time.monotonic() - t0 < 2
    with pytest.raises(ShuttingDown):
        sched.submit(Request([1], greedy()))
    sched.thread.join(timeout=5)
    assert not sched.thread.is_alive() and sched.stats()["kv_tokens"] == 0


def test_a_bug_outside_the_per_request_guards_fails_the_requests_in_flight_not_the_scheduler(model):
    sched = Scheduler(model, slots=1, max_len=64)
    try:
        release = sched.engine.release
        sched.engine.release = lambda slot: (_ for _ in ()).throw(RuntimeError("bug"))  # admission fails
        stranded = Request(PROMPTS[0], greedy())
        assert run(sched, stranded)[1:] == ("error", "generation failed: internal error in the scheduler")
        sched.engine.release = release
        assert run(sched, Request(PROMPTS[0], greedy(3)))[1] == "length"
    finally:
        sched.close()


def test_int8_kv_cache_in_serving_gives_each_request_its_output_alone(model):
    """`slimlm serve --kv-dtype int8`: the scheduler's engine stores keys and values as int8, and
    requests decoded together get what the engine with the same cache gives each alone."""
    from slimlm.engine.generate import generate_ids

    sched = Scheduler(model, slots=3, max_len=64, kv_dtype="int8")
    try:
        assert sched.engine.cache.quantized and sched.engine.cache.k[0].dtype == torch.int8
        requests = [Request(p, greedy()) for p in PROMPTS]  # 5 requests on 3 slots: slots are reused
        for r in requests:
            sched.submit(r)
        got = [drain(r)[0] for r in requests]
    finally:
        sched.close()
    for prompt, tokens in zip(PROMPTS, got):
        alone = generate_ids(model, torch.tensor([prompt]), greedy(), engine=True, kv_dtype="int8")[0].tolist()
        assert tokens == alone


def test_kv_dtype_is_checked_before_anything_loads():
    from slimlm.server.config import ServeConfig

    assert ServeConfig(kv_dtype="int8").scheduler_settings()["kv_dtype"] == "int8"
    with pytest.raises(SlimError, match="kv_dtype 'fp8' must be auto or int8"):
        ServeConfig(kv_dtype="fp8")


def test_prompt_prefixes_come_from_the_prefix_cache_and_outputs_do_not_change(model):
    """Prefix caching: B shares A's 40-token prefix while A runs, so B starts from A's two whole blocks
    of 16 (32 tokens, counted in stats); after A finishes, a follow-up turn (A's prompt, A's answer, a
    new message) starts from A's cached blocks, answer included. Every output is its output alone, and
    with prefix caching off nothing is reused."""
    shared = [int(t) for t in torch.randint(1, 300, (40,), generator=torch.Generator().manual_seed(0))]
    a, b = shared + [7, 8], shared + [9, 10, 11]
    alone = Scheduler(model, slots=1, max_len=160, prefix_caching=False)
    try:
        want_a, want_b = run(alone, Request(a, greedy(60)))[0], run(alone, Request(b, greedy(8)))[0]
        turn = a + want_a + [12, 13]  # 104 tokens: six whole blocks cached
        want_turn = run(alone, Request(turn, greedy(8)))[0]
        assert alone.stats()["shared_prefix_tokens"] == 0
    finally:
        alone.close()
    sched = Scheduler(model, slots=3, max_len=160, prefill_chunk=512)
    try:
        first = Request(a, greedy(60))
        sched.submit(first)
        while not first.generated:  # A's prompt is in the cache
            time.sleep(0.005)
        got_b = run(sched, Request(b, greedy(8)))[0]
        assert sched.stats()["shared_prefix_tokens"] == 32
        got_a = drain(first)[0]
        got_turn = run(sched, Request(turn, greedy(8)))[0]
        assert sched.stats()["shared_prefix_tokens"] == 32 + 96
        stats = sched.stats()
        assert stats["kv_blocks_used"] == 0 and stats["kv_blocks_cached"] > 0 and stats["kv_tokens"] == 0
    finally:
        sched.close()
    assert (got_a, got_b, got_turn) == (want_a, want_b, want_turn)


def test_requests_admitted_together_start_from_the_blocks_the_first_one_prefilled(model):
    """Four requests with one 40-token system prompt arrive at once: nothing is cached when they are
    admitted, but each checks the cache again when its prefill starts (oldest first, 16 tokens per
    iteration), so the later three start from the first one's two blocks; outputs unchanged."""
    system = [int(t) for t in torch.randint(1, 300, (40,), generator=torch.Generator().manual_seed(1))]
    prompts = [system + [20 + i, 30 + i] for i in range(4)]
    alone = Scheduler(model, slots=1, max_len=96, prefix_caching=False)
    try:
        want = [run(alone, Request(p, greedy(6)))[0] for p in prompts]
    finally:
        alone.close()
    sched = Scheduler(model, slots=4, max_len=96, prefill_chunk=16)
    try:
        busy = sched.call(time.sleep, 0.3)  # the scheduler is busy: all four are admitted in its next iteration
        requests = [sched.submit(Request(p, greedy(6))) for p in prompts]
        busy.result()
        got = [drain(r)[0] for r in requests]
        assert sched.stats()["shared_prefix_tokens"] == 3 * 32
    finally:
        sched.close()
    assert got == want


def test_a_full_kv_cache_preempts_the_newest_requests_and_every_output_is_unchanged(model):
    """64 tokens of cache for six requests of up to 38 tokens each: the newest are preempted (their
    blocks freed, to resume by prefilling prompt + output so far) whenever the running ones need blocks;
    greedy and seeded sampled outputs equal each request's output alone, and no block is left held."""
    prompts = [[int(t) for t in torch.randint(1, 300, (n,), generator=torch.Generator().manual_seed(n))]
               for n in (6, 9, 13, 7, 10, 8)]
    params = [greedy(24) if i % 2 else SamplingParams(max_new_tokens=24, temperature=0.8, seed=i)
              for i in range(len(prompts))]
    alone = Scheduler(model, slots=1, max_len=64, prefix_caching=False)
    try:
        want = [run(alone, Request(p, q))[0] for p, q in zip(prompts, params)]
    finally:
        alone.close()
    sched = Scheduler(model, slots=6, max_len=64, kv_tokens=64, block_size=4)
    try:
        requests = [Request(p, q) for p, q in zip(prompts, params)]
        for r in requests:
            sched.submit(r)
        got = [drain(r)[0] for r in requests]
        stats = sched.stats()
    finally:
        sched.close()
    assert got == want
    assert stats["preemptions"] > 0 and stats["kv_blocks_used"] == 0 and stats["kv_capacity"] == 64
    small = Scheduler(model, slots=2, max_len=128, kv_tokens=64)
    try:
        with pytest.raises(SlimError, match="KV cache holds 64 tokens in all.*--kv-tokens"):
            small.submit(Request(prompts[0], greedy(60)))
    finally:
        small.close()


def test_speculation_with_prompt_lookup(model):
    """`slimlm serve --draft ngram`: decoding sequences take speculative steps (prompt lookup, verified
    in one forward for the batch); outputs equal plain decoding, greedy; counts reach stats (/metrics)."""
    prompt = [5, 6, 7, 8, 5, 6, 7, 9, 5, 6, 7, 8, 5, 6]
    plain = Scheduler(model, slots=2, max_len=96)
    spec = Scheduler(model, slots=2, max_len=96, draft="ngram", num_speculative=3)
    try:
        want = run(plain, Request(prompt, greedy(40)))[0]
        got = run(spec, Request(prompt, greedy(40)))[0]
        stats = spec.stats()
        together = [Request(p, greedy(12)) for p in (prompt, PROMPTS[1])]  # two verified in one forward
        for r in together:
            spec.submit(r)
        assert [drain(r)[0] for r in together] == [want[:12], run(plain, Request(PROMPTS[1], greedy(12)))[0]]
    finally:
        plain.close()
        spec.close()
    assert got == want
    assert stats["spec_steps"] > 0 and 0 <= stats["spec_accepted"] <= stats["spec_proposed"]
    assert stats["spec_emitted"] >= stats["spec_steps"]
    with pytest.raises(SlimError, match="draft"):
        Scheduler(model, slots=1, draft="some/folder")


def test_a_draft_model_speculates_for_a_batch_and_outputs_do_not_change(model):
    """`slimlm serve --draft FOLDER`: a draft model proposes for every decoding request (a slot of its
    own engine per request), one forward verifies the batch. With the model as its own draft every
    proposal is accepted (the verification scores what the draft computed); with a one-layer draft
    some are rejected; either way greedy outputs equal plain decoding, and seeded sampling runs."""
    from slimlm.testing import tiny_model

    prompts = PROMPTS[:4]
    plain = Scheduler(model, slots=4, max_len=96)
    try:
        want = [run(plain, Request(p, greedy(20)))[0] for p in prompts]
    finally:
        plain.close()
    weak = tiny_model("llama", num_hidden_layers=1)
    for draft, everything in ((model, True), (weak, False)):
        spec = Scheduler(model, slots=4, max_len=96, draft=draft, num_speculative=3)
        try:
            requests = [Request(p, greedy(20)) for p in prompts]
            for r in requests:
                spec.submit(r)
            got = [drain(r)[0] for r in requests]
            sampled = run(spec, Request(prompts[0], SamplingParams(max_new_tokens=12, temperature=0.9, seed=3)))
            stats = spec.stats()
        finally:
            spec.close()
        assert got == want and len(sampled[0]) == 12
        assert stats["spec_steps"] > 0
        assert (stats["spec_accepted"] == stats["spec_proposed"]) == everything, stats
    with pytest.raises(SlimError, match="vocabulary"):
        Scheduler(model, slots=1, draft=tiny_model("llama", vocab_size=400))


def test_metrics_report_speculation_and_shared_prefixes():
    pytest.importorskip("prometheus_client")
    from slimlm.server.metrics import Metrics

    m = Metrics()
    m.observe_batch(1, {"waiting": 0, "running": 1, "kv_tokens": 9, "kv_capacity": 64, "shared_prefix_tokens": 40,
                        "spec_steps": 4, "spec_proposed": 12, "spec_accepted": 9, "spec_emitted": 13}, "m")
    text = m.render()
    assert 'slimlm_spec_acceptance_rate{model="m"} 0.75' in text and 'slimlm_spec_tokens_per_step{model="m"} 3.25' in text
    assert 'slimlm_shared_prefix_tokens{model="m"} 40.0' in text


def test_prefills_ride_along_decode_steps_and_outputs_do_not_change(model):
    """New requests arriving while others decode are prefilled in the decode step's forward (`Engine.step`,
    mixed steps); greedy and seeded sampled outputs equal each request's output alone. When a mixed step
    fails, its parts run again apart and nothing changes either."""
    prompts = [[int(t) for t in torch.randint(1, 300, (n,), generator=torch.Generator().manual_seed(n))]
               for n in (3, 9, 5, 12, 4, 7, 70)]  # the last: longer than a mixed chunk, prefilled apart
    params = [greedy(20) if i % 2 else SamplingParams(max_new_tokens=20, temperature=0.9, seed=i)
              for i in range(len(prompts))]
    params[0] = greedy(100)  # still decoding when the others arrive
    alone = Scheduler(model, slots=1, max_len=128, prefix_caching=False, mixed_steps=False)  # prefills of their own
    try:
        want = [run(alone, Request(p, q))[0] for p, q in zip(prompts, params)]
    finally:
        alone.close()
    for failing in (False, True):
        sched = Scheduler(model, slots=4, max_len=128)
        assert sched.engine.can_mix
        step, calls = sched.engine.step, []

        def counting_step(slots, feeds):
            calls.append([len(f) for f in feeds])
            if failing and len(calls) % 2:
                raise RuntimeError("boom")
            return step(slots, feeds)

        sched.engine.step = counting_step
        try:
            requests = [Request(p, q) for p, q in zip(prompts, params)]
            sched.submit(requests[0])
            deadline = time.monotonic() + 30
            while not requests[0].generated and time.monotonic() < deadline:
                time.sleep(0.001)
            for r in requests[1:]:  # arrivals while the first decodes
                sched.submit(r)
            got = [drain(r)[0] for r in requests]
        finally:
            sched.close()
        assert got == want
        assert any(max(c) > 1 and min(c) == 1 for c in calls)  # prefill rows and decode rows in one step
        assert all(max(c) <= 64 for c in calls)


def test_prompts_admitted_together_share_their_prefix_with_mixed_steps(model):
    """Four requests with one 40-token system prompt arrive together while another decodes: the first's
    prompt rides along the decode step, the others wait an iteration and start from its cached blocks
    (rather than each computing and holding its own copy)."""
    system = [int(t) for t in torch.randint(1, 300, (40,), generator=torch.Generator().manual_seed(3))]
    sched = Scheduler(model, slots=6, max_len=128, block_size=16)
    try:
        first = Request([5, 6, 7], greedy(100))
        sched.submit(first)
        deadline = time.monotonic() + 30
        while not first.generated and time.monotonic() < deadline:
            time.sleep(0.001)
        requests = [Request(system + [50 + i], greedy(8)) for i in range(4)]
        for r in requests:
            sched.submit(r)
        for r in requests:
            drain(r)
        shared = sched.stats()["shared_prefix_tokens"]
        first.cancel()
        drain(first)
    finally:
        sched.close()
    assert shared >= 3 * 32  # two full blocks of the system prompt, for each of the three later requests
