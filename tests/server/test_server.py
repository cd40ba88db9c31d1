"""The server through the official openai client and raw HTTP: completions, chat, streaming,
errors, concurrency, backpressure, disconnects, metrics."""

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from slimlm.server.app import ServeSettings  # noqa: E402
from slimlm.server.server import BackgroundServer, build_app  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_folder):
    app, models = build_app(str(tiny_folder("llama")), ServeSettings(max_tokens_limit=300), slots=4, max_len=256,
                            max_queue=32)
    with BackgroundServer(app) as url:
        yield url, models
    for m in models.values():
        m.scheduler.close()


def client(url, key="unused"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def post(url, path, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def test_completions_chat_streaming_and_models(server):
    url, models = server
    name = next(iter(models))
    c = client(url)
    assert [m.id for m in c.models.list().data] == [name]
    full = c.completions.create(model=name, prompt="Once upon a time", max_tokens=10, temperature=0)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 10
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model=name, prompt="Once upon a time",
                                                                         max_tokens=10, temperature=0, stream=True))
    assert streamed == full.choices[0].text
    chat = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "count: one, two"}], max_tokens=6)
    chunks = list(c.chat.completions.create(model=name, messages=[{"role": "user", "content": "count: one, two"}],
                                            max_tokens=6, temperature=0, stream=True))
    assert chat.choices[0].message.role == "assistant" and chunks[-1].choices[0].finish_reason == "length"
    two = c.completions.create(model=name, prompt="The quick", max_tokens=5, n=2, temperature=1.0, seed=3)
    again = c.completions.create(model=name, prompt="The quick", max_tokens=5, n=2, temperature=1.0, seed=3)
    assert [x.text for x in two.choices] == [x.text for x in again.choices]  # seeded sampling is reproducible


def test_stream_options_include_usage_ends_the_stream_with_the_usage(server):
    """With stream_options.include_usage the last chunk has no choices and the usage, the same as the
    whole reply's (completions with n=2 and chat); without it no chunk carries a usage; stream_options
    without stream is a 400."""
    url, models = server
    c, name = client(url), next(iter(models))
    whole = c.completions.create(model=name, prompt="Once upon a time", max_tokens=12, temperature=0, n=2)
    chunks = list(c.completions.create(model=name, prompt="Once upon a time", max_tokens=12, temperature=0, n=2,
                                       stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert whole.usage.completion_tokens == 24 and all(ch.usage is None for ch in chunks[:-1])
    text = "".join(ch.choices[0].text for ch in chunks[:-1] if ch.choices[0].index == 0)
    assert text == whole.choices[0].text
    plain = list(c.completions.create(model=name, prompt="Once upon a time", max_tokens=12, temperature=0, stream=True))
    assert all(ch.usage is None and ch.choices for ch in plain)
    messages = [{"role": "user", "content": "count: one, two"}]
    chat = c.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0)
    streamed = list(c.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert streamed[-1].choices == [] and streamed[-1].usage == chat.usage
    status, body, _ = post(url, "/v1/completions", {"model": name, "prompt": "x", "stream_options": {"include_usage": True}})
    assert status == 400 and "stream" in body["error"]["message"]


def test_usage_counts_the_same_tokens_streamed_or_not_when_a_stop_string_cuts(server):
    """The tokens up to the one that completes the stop string, whether the stream sent them one per chunk
    or several (tokens that waited) or the reply came whole."""
    url, models = server
    c, name = client(url), next(iter(models))
    text = c.completions.create(model=name, prompt="one, two", max_tokens=30, temperature=0).choices[0].text
    stop = text[10:13]
    whole = c.completions.create(model=name, prompt="one, two", max_tokens=30, temperature=0, stop=[stop])
    assert whole.choices[0].finish_reason == "stop" and 0 < whole.usage.completion_tokens < 30
    for _ in range(3):
        chunks = list(c.completions.create(model=name, prompt="one, two", max_tokens=30, temperature=0, stop=[stop],
                                           stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage == whole.usage
        assert "".join(ch.choices[0].text for ch in chunks[:-1]) == whole.choices[0].text, (
            [ch.choices[0].text for ch in chunks[:-1]], repr(text), repr(stop))


def test_stop_strings_cut_the_text(server):
    """The reply ends right before the first stop string (of several), with finish_reason 'stop', in
    plain and streamed replies; the uncut greedy text is the reference."""
    url, models = server
    c, name = client(url), next(iter(models))
    text = c.completions.create(model=name, prompt="one, two", max_tokens=20, temperature=0).choices[0].text
    assert len(text) >= 8, f"the tiny model must say enough to cut: {text!r}"
    first, later = text[3:5], text[6:8]
    want = text[: min(text.find(first), text.find(later))]
    cut = c.completions.create(model=name, prompt="one, two", max_tokens=20, temperature=0, stop=[later, first])
    assert cut.choices[0].text == want and cut.choices[0].finish_reason == "stop"
    assert len(want) < len(text)
    streamed = list(c.completions.create(model=name, prompt="one, two", max_tokens=20, temperature=0, stop=[later, first],
                                         stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == want and streamed[-1].choices[0].finish_reason == "stop"


def test_concurrent_requests_get_their_solo_outputs(server):
    url, models = server
    name, c = next(iter(models)), client(url)
    prompts = ["Once upon", "The quick brown fox", "def add(a, b):", "0123", "Compression makes models", "one, two"]
    solo = {p: c.completions.create(model=name, prompt=p, max_tokens=12, temperature=0).choices[0].text for p in prompts}
    results = []

    def ask(p):
        results.append((p, c.completions.create(model=name, prompt=p, max_tokens=12, temperature=0).choices[0].text))

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 * len(prompts) and all(text == solo[p] for p, text in results)


def test_logprobs_and_echo_score_a_prompt(server):
    import torch

    url, models = server
    served = next(iter(models.values()))
    status, body, _ = post(url, "/v1/completions", {"model": served.name, "prompt": "The quick brown fox",
                                                    "max_tokens": 0, "echo": True, "logprobs": 1})
    assert status == 200
    scores = body["choices"][0]["logprobs"]["token_logprobs"]
    ids = served.tokenizer("The quick brown fox")["input_ids"]
    with torch.no_grad():
        logp = served.model(torch.tensor([ids])).logits[0].log_softmax(-1)
    assert scores[0] is None and scores[1:] == pytest.approx([float(logp[i - 1, t]) for i, t in enumerate(ids) if i],
                                                             abs=1e-4)
    top = body["choices"][0]["logprobs"]["top_logprobs"]
    assert top[0] is None and all(len(t) == 1 for t in top[1:])  # the greedy alternative at each position
    # generated tokens: greedy, so each token is its position's top alternative
    status, body, _ = post(url, "/v1/completions", {"prompt": "The quick", "max_tokens": 4, "logprobs": 2,
                                                    "temperature": 0})
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 4 and all(len(t) == 2 for t in lp["top_logprobs"])
    assert all(max(t.values()) == pytest.approx(v, abs=1e-5) for t, v in zip(lp["top_logprobs"], lp["token_logprobs"]))


@pytest.mark.parametrize("body, status, text", [
    (b"{not json", 400, "not valid JSON"),
    ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": 7}, 400, "temperature"),
    ({"prompt": "word " * 300, "max_tokens": 10}, 400, "context"),
    ({"model": "nope", "prompt": "x"}, 404, "not served"),
    ({"max_tokens": 3}, 400, "prompt"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status, text):
    url, models = server
    code, reply, _ = post(url, "/v1/completions", body)
    assert code == status and text in reply["error"]["message"] and "type" in reply["error"]
    ok = client(url).completions.create(model=next(iter(models)), prompt="hi", max_tokens=2)
    assert ok.choices[0].finish_reason == "length"


def test_chat_rejects_malformed_messages(server):
    url, _ = server
    code, reply, _ = post(url, "/v1/chat/completions", {"messages": [{"role": "user"}]})
    assert code == 400 and "messages" in reply["error"]["message"]


def test_disconnect_frees_the_slot_and_metrics_move(server):
    url, models = server
    served = next(iter(models.values()))
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(
        {"prompt": "Once", "max_tokens": 250, "stream": True, "temperature": 0}).encode(),
        headers={"Content-Type": "application/json"})
    response = urllib.request.urlopen(req, timeout=30)
    response.readline()  # the first event arrived: the request is running
    response.close()
    for _ in range(200):
        if served.scheduler.stats()["running"] == 0:
            break
        time.sleep(0.02)
    assert served.scheduler.stats()["running"] == 0
    metrics = urllib.request.urlopen(url + "/metrics").read().decode()
    assert 'slimlm_requests_total{finish="cancelled"' in metrics
    assert "slimlm_time_to_first_token_seconds_count" in metrics and "slimlm_kv_cache_capacity_tokens" in metrics


def test_api_key_and_queue_bounds(tiny_folder):
    app, models = build_app(str(tiny_folder("llama")), ServeSettings(api_key="sekret", max_tokens_limit=300),
                            slots=1, max_len=256, max_queue=1)
    try:
        with BackgroundServer(app) as url:
            assert urllib.request.urlopen(url + "/health").status == 200  # no key needed
            with pytest.raises(openai.AuthenticationError):
                client(url, "wrong").models.list()
            good = client(url, "sekret")
            assert good.models.list().data
            auth = {"Authorization": "Bearer sekret"}
            # one long request holds the only slot, a second waits, a third finds the queue full
            streams = []
            for _ in range(2):
                req = urllib.request.Request(url + "/v1/completions", data=json.dumps(
                    {"prompt": "Once", "max_tokens": 250, "stream": True}).encode(),
                    headers={"Content-Type": "application/json", **auth})
                streams.append(urllib.request.urlopen(req, timeout=30))
            code, reply, headers = post(url, "/v1/completions", {"prompt": "x", "max_tokens": 2}, auth)
            assert code == 429 and headers.get("retry-after") == "1" and reply["error"]["type"] == "rate_limit_error"
            for s in streams:
                s.close()
    finally:
        for m in models.values():
            m.scheduler.close()


def test_a_folder_of_models_serves_each_by_name(tmp_path):
    from slimlm.testing.tiny import save_tiny_model

    save_tiny_model(tmp_path / "llama-a", "llama")
    save_tiny_model(tmp_path / "qwen-b", "qwen2")
    app, models = build_app(str(tmp_path), ServeSettings(), slots=2, max_len=64)
    try:
        with BackgroundServer(app) as url:
            c = client(url)
            assert sorted(m.id for m in c.models.list().data) == ["llama-a", "qwen-b"]
            for name in ("llama-a", "qwen-b"):
                assert c.completions.create(model=name, prompt="hi", max_tokens=3).usage.completion_tokens == 3
    finally:
        for m in models.values():
            m.scheduler.close()


def test_timeouts_and_oversize_bodies(tiny_folder):
    app, models = build_app(str(tiny_folder("llama")), ServeSettings(request_timeout=0.0, max_request_bytes=2000),
                            slots=1, max_len=256)
    try:
        with BackgroundServer(app) as url:
            code, reply, _ = post(url, "/v1/completions", {"prompt": "Once", "max_tokens": 200})
            assert code == 504 and "longer than" in reply["error"]["message"]
            code, reply, _ = post(url, "/v1/completions", {"prompt": "x" * 5000})
            assert code == 413
    finally:
        for m in models.values():
            m.scheduler.close()


def test_bench_serve_prints_the_load_table(tiny_folder, capsys):
    from slimlm.cli import main

    code = main(["bench", str(tiny_folder("llama")), "--serve", "--concurrency", "1,2", "--slots", "2", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0 and [(r["server"], r["clients"]) for r in rows] == [
        ("continuous, 2 slots", 1), ("continuous, 2 slots", 2), ("one at a time", 1), ("one at a time", 2)]
    assert all(r["tok_s"] > 0 and r["ttft_p50"] > 0 for r in rows)
    # each level against the engine's own decode at its batch (clients, at most the slots; 1 alone)
    assert all(r["engine_tok_s"] > 0 and r["served_share"] == r["tok_s"] / r["engine_tok_s"] for r in rows)
    assert rows[1]["engine_tok_s"] != rows[0]["engine_tok_s"] and rows[3]["engine_tok_s"] == rows[0]["engine_tok_s"]
    # and against the engine alone on the threads the server computes on (all cores but one), where fewer
    for r in rows:
        assert r["server_compute_threads"] == max(1, r["engine_threads"] - 1)
        if r["server_compute_threads"] < r["engine_threads"]:
            assert r["served_share_server_threads"] == r["tok_s"] / r["engine_tok_s_server_threads"] > 0
        else:
            assert "engine_tok_s_server_threads" not in r


def test_a_batch_of_prompts_answers_each_as_alone(server):
    """OpenAI's batched completions: a list of texts or of token-id lists; choices p·n .. p·n + n - 1
    answer prompt p, each as the prompt alone would be (greedy), and scoring (echo + logprobs, the way
    lm-eval's local-completions asks) gives each prompt's own log-probabilities."""
    url, models = server
    c, name = client(url), next(iter(models))
    texts = ["Once upon", "The quick brown fox", "def add(a, b):"]
    batch = c.completions.create(model=name, prompt=texts, max_tokens=8, temperature=0, n=2)
    assert [ch.index for ch in batch.choices] == list(range(6))
    for p, text in enumerate(texts):
        alone = c.completions.create(model=name, prompt=text, max_tokens=8, temperature=0).choices[0].text
        assert batch.choices[2 * p].text == batch.choices[2 * p + 1].text == alone
    ids = [[5, 6, 7, 8], [9, 10, 11]]
    scored = c.completions.create(model=name, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
    for p, prompt in enumerate(ids):
        alone = c.completions.create(model=name, prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=1)
        assert scored.choices[p].logprobs.token_logprobs == alone.choices[0].logprobs.token_logprobs
    assert scored.usage.prompt_tokens == 7
    code, reply, _ = post(url, "/v1/completions", {"model": name, "prompt": texts, "stream": True})
    assert code == 400 and "stream one prompt" in reply["error"]["message"]
    code, reply, _ = post(url, "/v1/completions", {"model": name, "prompt": [[1, 2], []]})
    assert code == 400
