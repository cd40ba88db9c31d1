"""Issue 18's server items over HTTP: bad requests are 400s that harm nobody else, the body limit
holds for chunked uploads, tokenizing does not stall the event loop, failures inside a stream end
it with an error event and [DONE], and clients that leave are cancelled promptly, under load too."""

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from slimlm.server.app import ServedModel, ServeSettings, create_app  # noqa: E402
from slimlm.server.metrics import Metrics  # noqa: E402
from slimlm.server.scheduler import Scheduler  # noqa: E402
from slimlm.server.server import BackgroundServer  # noqa: E402


class RecordingMetrics(Metrics):
    """Metrics that also keep (prompt, reason, time, tokens generated) of every finished request."""

    def __init__(self):
        super().__init__()
        self.finished = []

    def observe_finish(self, request, reason, model="model"):
        super().observe_finish(request, reason, model)
        self.finished.append((tuple(request.prompt), reason, time.monotonic(), len(request.generated)))


@pytest.fixture(scope="module")
def parts(tiny_folder):
    from slimlm.api import load

    return load(str(tiny_folder("llama")))


def serve(parts, settings=None, slots=4, max_len=256, tokenizer=None, **scheduler):
    model, tok = parts
    metrics = RecordingMetrics()
    sched = Scheduler(model, slots=slots, max_len=max_len, max_queue=64, metrics=metrics, name="m", **scheduler)
    app = create_app({"m": ServedModel("m", model, tokenizer or tok, sched)}, settings or ServeSettings(), metrics)
    return app, sched, metrics


@pytest.fixture(scope="module")
def server(parts):
    app, sched, metrics = serve(parts, ServeSettings(max_tokens_limit=300))
    with BackgroundServer(app) as url:
        yield url, sched, metrics
    sched.close()


def post(url, body, path="/v1/completions", headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def stream_events(url, body, path="/v1/completions"):
    """Every `data:` payload of a streaming request, [DONE] included."""
    req = urllib.request.Request(url + path, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200
        return [line[6:].strip().decode() for line in r if line.startswith(b"data: ")]


def text_of(events):
    return "".join(json.loads(e)["choices"][0]["text"] for e in events if e.startswith("{") and "choices" in e)


BAD = [  # (body, what the message names)
    ({"prompt": [1, 5000]}, "vocabulary"),
    ({"prompt": [1, -1]}, "vocabulary"),
    ({"prompt": [True, False]}, "prompt"),
    ({"prompt": "x", "seed": 1e30}, "seed"),
    ({"prompt": "x", "seed": -1e30}, "seed"),
    ({"prompt": "x", "seed": 10**30}, "seed"),
    (b'{"prompt": "lone \\ud800 surrogate"}', "JSON"),
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "JSON"),
    (b'{"prompt": "x", "max_tokens": ' + b"7" * 5000 + b"}", "JSON"),
    ({"prompt": [1, 5000], "echo": True, "logprobs": 1, "max_tokens": 0}, "vocabulary"),
    ({"prompt": "x", "temperature": float("nan")}, "temperature"),
    ({"prompt": "x", "stop": ["a", 1]}, "stop"),
    ({"prompt": "x", "top_k": -1}, "top_k"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
]


def test_bad_requests_are_400s_and_requests_in_flight_are_unharmed(server):
    url, sched, _ = server
    prompts = ["Once upon", "The quick brown fox", "def add(a, b):", "0123"]
    body = {"max_tokens": 40, "temperature": 0}
    solo = {p: text_of(stream_events(url, {**body, "prompt": p})) for p in prompts}
    got, errors, started = {}, [], threading.Barrier(len(prompts) + 1)

    def ask(p):
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps({**body, "prompt": p, "stream": True})
                                     .encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            events = [r.readline()[6:].strip().decode()]
            started.wait()  # every stream is running: now the bad requests arrive
            events += [line[6:].strip().decode() for line in r if line.startswith(b"data: ")]
        got[p] = (text_of(events), events[-1])

    decode = sched.engine.decode
    sched.engine.decode = lambda *a: (time.sleep(0.005), decode(*a))[1]  # the streams outlast the bad requests
    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    try:
        for t in threads:
            t.start()
        started.wait()
        for bad, text in BAD:
            path = "/v1/chat/completions" if isinstance(bad, dict) and "messages" in bad else "/v1/completions"
            code, reply = post(url, bad if isinstance(bad, bytes) else json.dumps(bad, allow_nan=True).encode(), path)
            if code != 400 or text not in reply["error"]["message"] or reply["error"]["type"] != "invalid_request_error":
                errors.append((str(bad)[:60], code, reply))
        running_during = sched.stats()["running"]
        for t in threads:
            t.join()
    finally:
        sched.engine.decode = decode
    assert not errors and running_during > 0
    assert got == {p: (solo[p], "[DONE]") for p in prompts}
    tiny = post(url, {**body, "prompt": "Once upon", "temperature": 1e-40, "seed": 5})
    assert tiny[0] == 200 and tiny[1]["choices"][0]["text"] == solo["Once upon"]  # a tiny temperature is greedy
    metrics = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    assert 'slimlm_kv_cache_tokens{model="m"} 0.0' in metrics  # every slot freed once idle


def test_a_non_ascii_authorization_header_is_a_client_error(parts):
    app, sched, _ = serve(parts, ServeSettings(api_key="sekret"))
    try:
        with BackgroundServer(app) as url:
            conn = http.client.HTTPConnection(urlparse(url).hostname, urlparse(url).port, timeout=10)
            conn.putrequest("GET", "/v1/models")
            conn.putheader("Authorization", "Bearer s\u00e9kret".encode("latin-1"))
            conn.endheaders()
            r = conn.getresponse()
            assert r.status == 400 and "ASCII" in json.loads(r.read())["error"]["message"]
            assert post(url, {"prompt": "x", "max_tokens": 1}, headers={"Authorization": "Bearer sekret"})[0] == 200
    finally:
        sched.close()


def chunked_post(url, chunks, path="/v1/completions"):
    """POST a body in chunked transfer encoding; (status, reply, seconds). Stops sending once answered."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    t0 = time.monotonic()
    conn.putrequest("POST", path)
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    try:
        for chunk in chunks:
            conn.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed before the whole body was sent, as it should
    r = conn.getresponse()
    out = r.status, json.loads(r.read()), time.monotonic() - t0
    conn.close()
    return out


def test_the_body_limit_holds_for_chunked_uploads(parts):
    app, sched, _ = serve(parts, ServeSettings(max_request_bytes=4000))
    try:
        with BackgroundServer(app) as url:
            body = [b'{"prompt": "'] + [b"x" * 1000] * 2000 + [b'"}']  # 2 MB, no Content-Length
            code, reply, _ = chunked_post(url, body)
            assert code == 413 and "4000 bytes" in reply["error"]["message"]
            small = [b'{"prompt": "Once', b' upon", "max_tokens": 2}']
            assert chunked_post(url, small)[0] == 200
    finally:
        sched.close()


class SlowTokenizer:
    """The tiny tokenizer, but encoding takes 1.5 s (a huge prompt)."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, *args, **kwargs):
        time.sleep(1.5)
        return self.tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_tokenizing_does_not_stall_other_clients(parts):
    app, sched, _ = serve(parts, tokenizer=SlowTokenizer(parts[1]))
    try:
        with BackgroundServer(app) as url:
            slow = threading.Thread(target=post, args=(url, {"prompt": "Once upon", "max_tokens": 2}))
            slow.start()
            time.sleep(0.3)  # the slow request is tokenizing now
            t0 = time.monotonic()
            assert urllib.request.urlopen(url + "/health", timeout=10).status == 200
            waited = time.monotonic() - t0
            slow.join()
            assert waited < 0.5, waited
    finally:
        sched.close()


def test_a_timeout_inside_a_stream_ends_it_with_an_error_event_and_done(parts):
    app, sched, _ = serve(parts, ServeSettings(request_timeout=0.0))
    try:
        with BackgroundServer(app) as url:
            events = stream_events(url, {"prompt": "Once", "max_tokens": 50})
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])["error"]
            assert error["type"] == "timeout_error" and "longer than" in error["message"]
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.APIError, match="longer than"):
                list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=5, stream=True))
    finally:
        sched.close()


def test_a_failure_mid_stream_ends_it_with_an_error_event_and_done(parts):
    app, sched, _ = serve(parts)
    decode, calls = sched.engine.decode, []

    def failing(slots, tokens):  # the fifth decode step fails
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("device lost")
        return decode(slots, tokens)

    sched.engine.decode = failing
    try:
        with BackgroundServer(app) as url:
            events = stream_events(url, {"prompt": "Once", "max_tokens": 50, "temperature": 0})
            assert events[-1] == "[DONE]" and len(events) >= 3
            # the tokens before the failure went out first (in one chunk or several: tokens that waited coalesce)
            assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-2])
            error = json.loads(events[-2])["error"]
            assert error["type"] == "server_error" and "device lost" in error["message"]
            assert post(url, {"prompt": "Once", "max_tokens": 3})[0] == 200  # and it keeps serving
    finally:
        sched.close()


def leave_early(url, prompt, stream, after):
    """Send a completion request, read for `after` s (streams: at least the first event), hang up;
    the monotonic time of hanging up."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    body = json.dumps({"prompt": prompt, "max_tokens": 240, "temperature": 0, "stream": stream})
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    if stream:
        conn.getresponse().readline()
    time.sleep(after)
    conn.sock.shutdown(2)
    conn.close()
    return time.monotonic()


def test_clients_that_leave_are_cancelled_within_a_second_under_load(parts):
    app, sched, metrics = serve(parts, ServeSettings(max_tokens_limit=300), slots=4)
    decode = sched.engine.decode
    sched.engine.decode = lambda *a: (time.sleep(0.003), decode(*a))[1]  # 240 tokens take over 0.7 s
    try:
        with BackgroundServer(app) as url:
            stayers, left, results = [], {}, []

            def stay(i):
                events = stream_events(url, {"prompt": [1, 2, 100 + i], "max_tokens": 40, "temperature": 0})
                results.append(events[-1])

            def go(i, stream):
                prompt = [3, 4, 200 + i]
                left[tuple(prompt)] = leave_early(url, prompt, stream, after=0.1)

            threads = [threading.Thread(target=stay, args=(i,)) for i in range(8)]
            threads += [threading.Thread(target=go, args=(i, i % 2 == 0)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and len([f for f in metrics.finished if f[0] in left]) < len(left):
                time.sleep(0.05)
    finally:
        sched.close()
    assert results == ["[DONE]"] * 8
    departed = {f[0]: f for f in metrics.finished if f[0] in left}
    assert len(departed) == 8 and all(f[1] == "cancelled" for f in departed.values()), departed
    lags = [departed[p][2] - t for p, t in left.items()]
    assert max(lags) < 1.0 and all(f[3] < 240 for f in departed.values()), (lags, departed)


def test_many_streams_sharing_a_system_prompt_some_leaving_get_their_solo_outputs_and_leave_nothing(parts):
    """Issue 17's load test: 64 streaming clients at once on 8 slots with prompt-lookup speculation on,
    all starting with one 40-token "system prompt" (its blocks come from the prefix cache), a quarter
    hanging up early, and a KV cache too small for eight requests at full length (so the newest are
    preempted and resume). Every completed answer equals its solo greedy output, prefixes were shared,
    and afterwards nothing runs, nothing waits and no KV block is held (the cache is preallocated, so
    memory does not grow with the load)."""
    system = [int(t) % 300 + 1 for t in range(7, 7 + 40 * 13, 13)]
    prompts = [system + [10 + i, 20 + i % 5] for i in range(64)]
    app, sched, metrics = serve(parts, ServeSettings(max_tokens_limit=300), slots=8, draft="ngram", kv_tokens=224)
    try:
        import torch

        from slimlm.engine.generate import generate_ids
        from slimlm.engine.sampling import SamplingParams

        eos = parts[1].eos_token_id
        params = SamplingParams(max_new_tokens=24, stop_ids=(eos,) if eos is not None else ())
        solo = {tuple(p): parts[1].decode(generate_ids(parts[0], torch.tensor([p]), params, engine=True)[0].tolist(),
                                          skip_special_tokens=True) for p in prompts}
        with BackgroundServer(app) as url:
            got = {}

            def client(i):
                p = prompts[i]
                if i % 4 == 3:
                    leave_early(url, p, stream=True, after=0.02)
                else:
                    got[tuple(p)] = text_of(stream_events(url, {"prompt": p, "max_tokens": 24, "temperature": 0}))

            threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and (sched.stats()["running"] or sched.stats()["waiting"]):
                time.sleep(0.05)
            stats = sched.stats()
    finally:
        sched.close()
    assert len(got) == 48 and all(text == solo[p] for p, text in got.items())
    assert stats["shared_prefix_tokens"] >= 32 * 40  # most requests started from the system prompt's two blocks
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_tokens"] == 0
    assert stats["kv_blocks_used"] == 0 and stats["preemptions"] > 0
