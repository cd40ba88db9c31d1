"""Hardening load test of the server on loopback (issue 18): many concurrent greedy streams, a
quarter of them hanging up early, bad requests mixed in (ids outside the vocabulary, wrong types,
seeds out of range, hostile JSON, a 16 MB chunked upload), all at once. It checks that

  - every good request completes with exactly its solo greedy output and ends with [DONE],
  - every bad request is a 400 (413 for the upload) and nobody else is harmed,
  - every client that left is cancelled on the server within a second,
  - /health stays responsive throughout, and the process returns to its memory baseline with the
    KV cache empty,

and prints the figures (exit status 1 if a check fails).

    python benchmarks/serve_hardening.py [--model demo --streams 64 --slots 16 --rounds 2]
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import threading
import time
from urllib.parse import urlparse

import psutil

import slimlm
from slimlm.server.app import ServedModel, ServeSettings, create_app
from slimlm.server.metrics import Metrics
from slimlm.server.scheduler import Scheduler
from slimlm.server.server import BackgroundServer

WORDS = ["The for statement", "Exceptions are raised when", "A class definition", "The import statement",
         "Numbers are created by", "The with statement", "A module is a file", "Strings are immutable"]
BAD = [  # (body, expected status)
    (b'{"prompt": [1, 5000], "max_tokens": 8}', 400),
    (b'{"prompt": [1, -1], "max_tokens": 8}', 400),
    (b'{"prompt": [true, false], "max_tokens": 8}', 400),
    (b'{"prompt": "x", "seed": 1e30}', 400),
    (b'{"prompt": "x", "seed": -1e30}', 400),
    (b'{"prompt": "lone \\ud800"}', 400),
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),
    (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", 400),
    (b'{"prompt": [1, 5000], "echo": true, "logprobs": 1, "max_tokens": 0}', 400),
    (b'{"prompt": "x", "temperature": NaN}', 400),
]


class RecordingMetrics(Metrics):
    """Also keeps (request id, reason, time, tokens generated) of every finished request."""

    def __init__(self) -> None:
        super().__init__()
        self.finished: list[tuple[str, str, float, int]] = []

    def observe_finish(self, request, reason, model="model"):
        super().observe_finish(request, reason, model)
        self.finished.append((request.id, reason, time.monotonic(), len(request.generated)))


def connect(url: str) -> http.client.HTTPConnection:
    u = urlparse(url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=120)


def stream(url: str, body: dict, leave_after: int | None = None) -> dict:
    """One streaming completion: its text, finish reason, [DONE], id; or hang up after
    `leave_after` token events (then `left_at` is when)."""
    conn = connect(url)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    out = {"status": r.status, "text": "", "finish": None, "done": False, "id": None, "tokens": 0, "error": None}
    for line in r:
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            out["done"] = True
            break
        chunk = json.loads(data)
        if "error" in chunk:
            out["error"] = chunk["error"]["message"]
            continue
        out["id"] = chunk["id"]
        choice = chunk["choices"][0]
        out["text"] += choice["text"]
        if choice["finish_reason"] is None:
            out["tokens"] += 1
        else:
            out["finish"] = choice["finish_reason"]
        if leave_after is not None and out["tokens"] >= leave_after:
            conn.sock.shutdown(2)
            conn.close()
            out["left_at"] = time.monotonic()
            return out
    conn.close()
    return out


def post_raw(url: str, body: bytes) -> int:
    conn = connect(url)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    status = conn.getresponse().status
    conn.close()
    return status


def chunked_upload(url: str, megabytes: int) -> tuple[int, float]:
    """A body of `megabytes` MB in chunked encoding (no Content-Length): (status, seconds)."""
    conn = connect(url)
    t0 = time.monotonic()
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    try:
        for piece in [b'{"prompt": "'] + [b"x" * (1 << 16)] * (megabytes * 16) + [b'"}', b""]:
            conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")  # the empty chunk ends the body
    except (BrokenPipeError, ConnectionResetError):
        pass  # answered and closed early, as it should
    status = conn.getresponse().status
    conn.close()
    return status, time.monotonic() - t0


def health_watch(url: str, stop: threading.Event, worst: list[float]) -> None:
    while not stop.is_set():
        conn = connect(url)
        t0 = time.monotonic()
        conn.request("GET", "/health")
        conn.getresponse().read()
        worst[0] = max(worst[0], time.monotonic() - t0)
        conn.close()
        time.sleep(0.05)


def one_round(url: str, args, solo: dict[str, str], metrics: RecordingMetrics) -> dict:
    n_leave = args.streams // 4
    jobs, results, lock = [], [], threading.Lock()
    for i in range(args.streams):
        prompt = f"{WORDS[i % len(WORDS)]} ({i % 16})"
        if i < n_leave:
            jobs.append(("leave", prompt, {"prompt": prompt, "max_tokens": 400, "temperature": 0}, 2 + i % 8))
        else:
            temperature = 1e-40 if i % 16 == 5 else 0  # a tiny temperature is greedy too
            body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": temperature, "seed": i}
            jobs.append(("good", prompt, body, None))
    jobs += [("bad", None, body, status) for body, status in BAD]
    jobs.append(("upload", None, None, 413))
    start = threading.Barrier(len(jobs))

    def work(kind, prompt, body, extra):
        start.wait()
        if kind in ("good", "leave"):
            out = stream(url, body, leave_after=extra if kind == "leave" else None)
        elif kind == "bad":
            out = {"status": post_raw(url, body)}
        else:
            status, seconds = chunked_upload(url, 16)
            out = {"status": status, "seconds": seconds}
        with lock:
            results.append((kind, prompt, extra, out))

    stop, worst_health = threading.Event(), [0.0]
    watcher = threading.Thread(target=health_watch, args=(url, stop, worst_health))
    watcher.start()
    threads = [threading.Thread(target=work, args=job) for job in jobs]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    time.sleep(1.0)  # let the last cancellations land
    stop.set()
    watcher.join()
    finished = {f[0]: f for f in metrics.finished}
    good = [r for r in results if r[0] == "good"]
    wrong = [(p, o) for _, p, _, o in good
             if not (o["done"] and o["text"] == solo[p] and o["finish"] and not o["error"])]
    bad_wrong = [(k, o["status"], want) for k, _, want, o in results if k in ("bad", "upload") and o["status"] != want]
    lags, leaked, gone = [], 0, [r for r in results if r[0] == "leave"]
    for _, _, _, o in gone:
        record = finished.get(o["id"])
        if record is None or record[1] != "cancelled":
            lags.append(float("inf"))
            continue
        lags.append(record[2] - o["left_at"])
        leaked += max(0, record[3] - o["tokens"])
    upload = next(o for k, _, _, o in results if k == "upload")
    return {"wall": wall, "good": len(good), "wrong": wrong, "bad": len(BAD) + 1, "bad_wrong": bad_wrong,
            "left": len(gone), "lags": sorted(lags), "leaked": leaked, "health_worst": worst_health[0],
            "upload_s": upload.get("seconds", float("nan")),
            "tokens": sum(o["tokens"] for _, _, _, o in good)}


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--streams", type=int, default=64, help="concurrent streaming clients (a quarter leave early)")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=96, help="max_tokens of the clients that stay")
    p.add_argument("--rounds", type=int, default=2, help="measured rounds after a warm-up round")
    args = p.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model, tok = slimlm.load(args.model)
    metrics = RecordingMetrics()
    sched = Scheduler(model, slots=args.slots, max_len=512, max_queue=4 * args.streams, metrics=metrics, name="m")
    app = create_app({"m": ServedModel("m", model, tok, sched)}, ServeSettings(), metrics)
    ok = True
    with BackgroundServer(app) as url:
        prompts = sorted({f"{WORDS[i % len(WORDS)]} ({i % 16})" for i in range(args.streams)})
        solo = {q: stream(url, {"prompt": q, "max_tokens": args.max_tokens, "temperature": 0})["text"] for q in prompts}
        print(f"model {args.model}, {args.slots} slots; {args.streams} streams ({args.streams // 4} leave after 2-9 "
              f"tokens, the rest want {args.max_tokens} greedy tokens) + {len(BAD)} bad requests + one 16 MB chunked "
              f"upload, all at once")
        rss_start = rss_mb()
        one_round(url, args, solo, metrics)  # warm-up: allocator arenas, thread stacks, CUDA graphs...
        baseline = rss_mb()
        print(f"{'round':>5} {'wall s':>7} {'good ok':>8} {'bad ok':>7} {'left':>5} {'cancel lag p50/max ms':>22} "
              f"{'tokens after leaving':>21} {'/health worst ms':>17} {'413 after ms':>13} {'RSS MB':>7}")
        for k in range(args.rounds):
            r = one_round(url, args, solo, metrics)
            stats = sched.stats()
            rss = rss_mb()
            lag50, lagmax = r["lags"][len(r["lags"]) // 2], r["lags"][-1]
            print(f"{k + 1:>5} {r['wall']:>7.1f} {r['good'] - len(r['wrong']):>4}/{r['good']:<3} "
                  f"{r['bad'] - len(r['bad_wrong']):>3}/{r['bad']:<3} {r['left']:>5} "
                  f"{1e3 * lag50:>10.0f} / {1e3 * lagmax:<9.0f} {r['leaked']:>21} {1e3 * r['health_worst']:>17.0f} "
                  f"{1e3 * r['upload_s']:>13.0f} {rss:>7.0f}", flush=True)
            checks = {"good requests with their solo output": not r["wrong"],
                      "bad requests refused": not r["bad_wrong"],
                      "departed cancelled within 1 s": lagmax < 1.0,
                      "KV cache empty when idle": stats["kv_tokens"] == 0,
                      "nothing running or waiting": stats["running"] == stats["waiting"] == 0}
            for name, passed in checks.items():
                if not passed:
                    ok = False
                    print(f"  FAILED: {name}: {r['wrong'][:2] or r['bad_wrong'] or r['lags'][-3:] or stats}")
        final = rss_mb()
    sched.close()
    print(f"RSS: {rss_start:.0f} MB before the warm-up round, {baseline:.0f} MB after it (baseline), {final:.0f} MB "
          f"after {args.rounds} more rounds ({final - baseline:+.0f} MB)")
    print("all checks passed" if ok else "some checks FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
