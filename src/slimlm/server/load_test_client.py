"""A load-test client, not part of the server: N concurrent streaming clients with a fixed mix of
prompt and response lengths against a running server; output tokens/s, time to first token and
inter-token latency percentiles (used by `slimlm bench --serve` and benchmarks/serve_load.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request

PROMPTS = ["The for statement", "Exceptions are raised when", "A class definition defines a class object",
           "The import statement", "Numbers are created by numeric literals", "The with statement is used"]
LENGTHS = [32, 64, 48, 96]  # max_tokens mix


def stream_one(url: str, prompt: str, max_tokens: int) -> tuple[float, list[float], int]:
    """(time to first token, gaps between text chunks, tokens) of one streaming completion. A chunk may
    carry several tokens (the server sends those that waited in one), so the tokens are counted from
    the usage chunk the stream ends with (`stream_options.include_usage`), not from the chunks."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    stamps, tokens = [], 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:  # a text chunk says finish_reason null; parsing every chunk's JSON cost the server CPU
            if line.startswith(b"data: {") and b'"finish_reason":null' in line:
                stamps.append(time.perf_counter())
            elif line.startswith(b'data: {') and b'"usage":{' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return (stamps[0] - t0 if stamps else float("nan")), gaps, tokens


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def run_load(url: str, concurrency: int, requests: int) -> dict:
    jobs = [(PROMPTS[i % len(PROMPTS)], LENGTHS[i % len(LENGTHS)]) for i in range(requests)]
    lock, results = threading.Lock(), []

    def worker():
        while True:
            with lock:
                if not jobs:
                    return
                prompt, n = jobs.pop()
            out = stream_one(url, prompt, n)
            with lock:
                results.append(out)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [r[0] for r in results]
    gaps = [g for r in results for g in r[1]]
    tokens = sum(r[2] for r in results)
    return {"tok_s": tokens / wall, "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99),
            "itl_p50": pct(gaps, 0.5), "itl_p99": pct(gaps, 0.99), "requests": len(results)}


def run_load_apart(url: str, concurrency: int, requests: int) -> dict:
    """`run_load` in a process of its own: its client threads then never wait for the server's
    interpreter lock (nor it for theirs); they still share the machine's cores."""
    code = f"import json; from slimlm.server.load_test_client import run_load; print(json.dumps(run_load({url!r}, {concurrency}, {requests})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the load client failed: {done.stderr[-1000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare_batching(model, tokenizer, levels: list[int], slots: int = 16, requests: int = 0,
                     on_row=None, source: str | None = None, device: str = "cpu") -> list[dict]:
    """The same load on continuous batching (`slots`) and one request at a time (1 slot): one row per
    (server, concurrency). source: the model's folder (or 'demo'), whose engine then runs in a process
    of its own as `slimlm serve` runs it; else `model`'s runs in this process."""
    from slimlm.server.app import ServedModel, ServeSettings, create_app
    from slimlm.server.metrics import Metrics
    from slimlm.server.replicas import ReplicaSet
    from slimlm.server.scheduler import Scheduler
    from slimlm.server.server import BackgroundServer

    rows = []
    for label, n in ((f"continuous, {slots} slots", slots), ("one at a time", 1)):
        metrics = Metrics()
        if source is not None:
            scheduler = ReplicaSet(source, 1, slots=n, max_len=256, max_queue=1024, metrics=metrics, name="m",
                                   device=device)
        else:
            scheduler = Scheduler(model, slots=n, max_len=256, max_queue=1024, metrics=metrics, name="m")
        app = create_app({"m": ServedModel("m", model, tokenizer, scheduler)}, ServeSettings(), metrics)
        try:
            with BackgroundServer(app) as url:
                run_load_apart(url, 2, 4)  # warm-up
                for c in levels:
                    row = {"server": label, "clients": c, **run_load_apart(url, c, requests or max(8, 2 * c))}
                    rows.append(row)
                    if on_row is not None:
                        on_row(row)
        finally:
            scheduler.close()
    return rows
