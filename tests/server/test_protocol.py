"""The typed protocol: the schema is served, handlers share one sampling type, scoring runs on the
scheduler's thread, and every failure answers in OpenAI's error shape."""

import json
import threading
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from slimlm.server.app import ServeSettings  # noqa: E402
from slimlm.server.server import BackgroundServer, build_app  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_folder):
    app, models = build_app(str(tiny_folder("llama")), ServeSettings(max_tokens_limit=100), slots=2, max_len=128)
    with BackgroundServer(app) as url:
        yield url, next(iter(models.values()))
    for m in models.values():
        m.scheduler.close()


def call(url, path, body=None, method=None, headers=None):
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw.startswith(b"{") else raw
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_openapi_schema_documents_the_request_and_response_bodies(server):
    url, _ = server
    status, schema = call(url, "/openapi.json")
    post = schema["paths"]["/v1/completions"]["post"]
    assert status == 200 and post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/CompletionRequest")
    props = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"prompt", "max_tokens", "temperature", "top_p", "seed", "logprobs", "echo", "stop"} <= set(props)
    assert "ChatCompletionRequest" in schema["components"]["schemas"] and "/v1/chat/completions" in schema["paths"]
    assert call(url, "/docs")[0] == 404  # the docs pages stay off


def test_prompt_scoring_runs_on_the_scheduler_thread(server):
    url, served = server
    threads, forward = [], served.model.forward

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return forward(*args, **kwargs)

    served.model.forward = recording
    try:
        status, body = call(url, "/v1/completions",
                            {"prompt": "The quick", "max_tokens": 0, "echo": True, "logprobs": 1})
    finally:
        del served.model.forward
    assert status == 200 and body["choices"][0]["logprobs"]["token_logprobs"][0] is None
    assert threads and all(name.startswith("slimlm-scheduler") for name in threads)


def test_the_scheduler_and_the_engine_share_one_sampling_type(server):
    from slimlm.engine.sampling import SamplingParams
    from slimlm.server.scheduler import Request

    assert Request.__dataclass_fields__["params"].type in (SamplingParams, "SamplingParams")


def test_the_load_test_client_is_named_for_what_it_is():
    from slimlm.server import load_test_client
    from slimlm.server.metrics import Metrics

    assert callable(load_test_client.compare_batching) and not hasattr(Metrics(), "started")


def test_unknown_routes_and_methods_answer_in_openai_shape_and_head_health_works(server):
    url, _ = server
    code, body = call(url, "/v2/nothing")
    assert code == 404 and body["error"]["code"] == "not_found" and "/v2/nothing" in body["error"]["message"]
    code, body = call(url, "/v1/completions")  # GET on a POST route
    assert code == 405 and body["error"]["code"] == "method_not_allowed"
    code, body = call(url, "/health", method="HEAD")
    assert code == 200 and body == b""


@pytest.mark.parametrize("which", ["demo", "tiny"])
def test_streamed_text_is_the_whole_decode(which):
    """The server decodes a short window per token (incremental detokenization); the deltas, plus what
    an unfinished character held back, add up to decoding all the tokens at once, for any tokens
    (multi-byte characters split across tokens, special tokens, spaces)."""
    import random

    import slimlm
    from slimlm.server.generation import Detokenizer
    from slimlm.testing.tiny import tiny_tokenizer

    tok = slimlm.load("demo")[1] if which == "demo" else tiny_tokenizer()
    rng = random.Random(0)
    texts = ["héllo wörld — ünïcödé ✓ 日本語", "  two  spaces\nnewline\ttab", "def f(x):\n    return x ** 2"]
    for trial in range(60):
        if trial < len(texts) * 2:
            ids = tok(texts[trial % len(texts)])["input_ids"]
        else:
            ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]
        detok = Detokenizer(tok)
        out = "".join(detok.add(t) for t in ids) + detok.rest()
        assert out == tok.decode(ids, skip_special_tokens=True), ids


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_a_token_chunk_from_the_template_is_the_models_chunk(kind):
    """Stream chunks of tokens come from a template rendered once per choice: the same JSON as the
    pydantic models give, for any text (quotes, backslashes, control and non-ASCII characters)."""
    from slimlm.server.generation import Reply

    reply = Reply(kind, "m")
    for index in (0, 2):
        for text in ["", "plain", 'quo"te \\ back', "\n\t\x00\x1f", "héllo ✓ 日本 \u2028", "slimlm-text-8f3a1c"]:
            fast, slow = reply.text_event(index, text), reply.event(reply.choice(index, text, None, chunk=True))
            assert fast.startswith("data: ") and fast.endswith("\n\n")
            assert json.loads(fast[6:]) == json.loads(slow[6:])
