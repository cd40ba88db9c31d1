"""Serving across processes: `slimlm serve` (its engine in a process of its own by default),
`--replicas 2` and `--tp 2` answer the official openai client with one process's greedy outputs; a
replica that dies fails only its own requests, the other goes on serving, and /health says the
server is degraded."""

import json
import os
import signal
import threading
import time
import urllib.request

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from slimlm.server.server import BackgroundServer, build_app  # noqa: E402
from slimlm.server.state import ServeSettings  # noqa: E402

PROMPTS = ["Once upon", "The quick brown fox", "def add(a, b):", "0123"]


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def greedy(url, name, max_tokens=8):
    c = client(url)
    return [c.completions.create(model=name, prompt=p, max_tokens=max_tokens, temperature=0).choices[0].text
            for p in PROMPTS]


@pytest.fixture(scope="module")
def solo(tiny_folder):
    app, models = build_app(str(tiny_folder("llama")), ServeSettings(), slots=2, max_len=256)
    with BackgroundServer(app) as url:
        yield greedy(url, next(iter(models)))
    for m in models.values():
        m.scheduler.close()


def health(url):
    try:
        with urllib.request.urlopen(url + "/health") as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def metric(url, name):
    with urllib.request.urlopen(url + "/metrics") as r:
        text = r.read().decode()
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line.startswith(name)}


def test_the_engine_process_serves_like_this_process_and_reports_its_metrics(tiny_folder, solo):
    """`slimlm serve`'s default: the engine in a worker process. Same greedy outputs; /metrics carries the
    engine's decode batch sizes, KV blocks and speculation counts; a prompt the KV cache cannot hold is a
    400 at submission, as in process."""
    from slimlm.server.config import ServeConfig

    assert ServeConfig().engine_process and ServeConfig().scheduler_settings()["engine_process"]
    app, models = build_app(str(tiny_folder("llama")), ServeSettings(), slots=2, max_len=256, engine_process=True,
                            kv_tokens=64, draft="ngram")
    name = next(iter(models))
    try:
        with BackgroundServer(app) as url:
            assert greedy(url, name) == solo
            assert health(url)[1]["replicas"] == {name: [True]}
            with pytest.raises(openai.BadRequestError, match="KV cache holds 64 tokens"):
                client(url).completions.create(model=name, prompt="a " * 40, max_tokens=40)
            time.sleep(1.2)  # two stats reports
            assert metric(url, "slimlm_decode_batch_size_count")[f'slimlm_decode_batch_size_count{{model="{name}"}}'] > 0
            blocks = metric(url, "slimlm_kv_cache_blocks")
            assert sum(blocks.values()) == 64 // 16 and blocks[f'slimlm_kv_cache_blocks{{model="{name}",state="used"}}'] == 0
            assert metric(url, "slimlm_spec_proposed_tokens")[f'slimlm_spec_proposed_tokens{{model="{name}"}}'] > 0
    finally:
        models[name].scheduler.close()


def test_an_engine_process_that_cannot_load_is_a_one_line_error(tmp_path, tiny_folder):
    import shutil

    from slimlm.core.errors import SlimError

    folder = tmp_path / "broken"
    shutil.copytree(tiny_folder("llama"), folder)
    for f in folder.glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    with pytest.raises(SlimError, match="engine process of model broken could not start") as e:
        build_app(str(folder), ServeSettings(), slots=2, max_len=256, engine_process=True)
    assert "\n" not in str(e.value)


def test_replicas_serve_and_survive_one_dying(tiny_folder):
    """Two replicas; one is killed while each streams a long answer: that stream ends with an error
    naming the replica, the other completes, and the survivor serves what both served before. The
    model has a 4096-token context so the streams (2000 tokens) are surely mid-flight at the kill."""
    folder = tiny_folder("llama", max_position_embeddings=4096)
    app, models = build_app(str(folder), ServeSettings(max_tokens_limit=4000), slots=2, max_len=4096, replicas=2)
    name = next(iter(models))
    replicas = models[name].scheduler
    try:
        with BackgroundServer(app) as url:
            before = greedy(url, name)
            assert health(url) == (200, {"status": "ok", "models": [name], "replicas": {name: [True, True]}})
            # two long streams, in flight: the least-loaded rule puts one on each replica
            c = client(url)
            streams = [iter(c.completions.create(model=name, prompt="Once upon", max_tokens=2000, temperature=0,
                                                 stream=True)) for _ in range(2)]
            firsts = [next(s).choices[0].text for s in streams]
            assert sorted(len(r.in_flight) for r in replicas.replicas) == [1, 1]
            os.kill(replicas.replicas[0].process.pid, signal.SIGKILL)
            results = {}

            def drain(key):
                try:
                    results[key] = ("ok", firsts[key] + "".join(ch.choices[0].text for ch in streams[key]))
                except openai.APIError as e:
                    results[key] = ("error", str(e))

            threads = [threading.Thread(target=drain, args=(k,)) for k in (0, 1)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert sorted(kind for kind, _ in results.values()) == ["error", "ok"]
            assert any("replica 0" in text for kind, text in results.values() if kind == "error")
            assert health(url) == (200, {"status": "degraded", "models": [name], "replicas": {name: [False, True]}})
            assert greedy(url, name) == before  # the survivor serves everything
            metrics = urllib.request.urlopen(url + "/metrics").read().decode()
            assert f'slimlm_replica_up{{model="{name}",replica="0"}} 0.0' in metrics
    finally:
        replicas.close()


def test_serve_with_tensor_parallelism(tiny_folder, solo):
    """TP=2 with prompt-lookup speculation (rollbacks: `truncate` on every rank) and prefix caching in
    blocks of 4 (the second round starts from the first round's blocks: `reuse_prefix` on every rank)."""
    app, models = build_app(str(tiny_folder("llama")), ServeSettings(), slots=2, max_len=256, tp=2, draft="ngram",
                            block_size=4)
    name = next(iter(models))
    try:
        with BackgroundServer(app) as url:
            assert greedy(url, name) == solo
            assert greedy(url, name) == solo
        stats = models[name].scheduler.stats()
        assert stats["shared_prefix_tokens"] > 0 and stats["spec_steps"] > 0
    finally:
        models[name].scheduler.close()
        models[name].model.slimlm_parallel.close()


def test_replicas_that_are_themselves_parallel(tiny_folder, solo):
    """Two replicas, each a PP=2 group of its own (five processes): one process's outputs."""
    app, models = build_app(str(tiny_folder("llama")), ServeSettings(), slots=2, max_len=256, replicas=2, pp=2)
    name = next(iter(models))
    replicas = models[name].scheduler
    try:
        with BackgroundServer(app) as url:
            assert greedy(url, name) == solo
            assert health(url)[1]["replicas"] == {name: [True, True]}
    finally:
        replicas.close()
    for r in replicas.replicas:  # each replica stopped its own stage processes and left
        r.process.join(timeout=30)
        assert r.process.exitcode is not None
