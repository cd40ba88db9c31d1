"""Two `slimlm serve` configurations side by side on one machine, loaded in alternating rounds: the
ratio of their served tokens/s per round (both servers stay up, so no round pays a start-up).

    python benchmarks/serve_ab.py --model demo --a= --b=--no-engine-process [--clients 16 --requests 160 --rounds 8]

(flags that start with a dash go after "=", or argparse reads them as its own)

Each round runs the same load (`server/load_test_client.py`: streaming clients in a process of their
own) against A then B, or B then A in odd rounds. Prints each side's tokens/s and the median ratio A/B
with its per-round range.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request


def start(model: str, flags: str, port: int, slots: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "slimlm", "serve", model, "--port", str(port), "--slots", str(slots), *shlex.split(flags)]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return process
        except OSError:
            if process.poll() is not None:
                raise SystemExit(f"slimlm serve {model} {flags} exited with {process.returncode}")
            time.sleep(0.2)
    raise SystemExit(f"slimlm serve {model} {flags} did not start")


def load(port: int, clients: int, requests: int) -> float:
    code = ("import json; from slimlm.server.load_test_client import run_load; "
            f"print(json.dumps(run_load('http://127.0.0.1:{port}', {clients}, {requests})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["tok_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--a", default="", help="A's extra `slimlm serve` flags")
    p.add_argument("--b", default="--no-engine-process", help="B's extra `slimlm serve` flags")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=160)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--slots", type=int, default=16)
    args = p.parse_args()
    servers = {"A": (start(args.model, args.a, 8461, args.slots), 8461),
               "B": (start(args.model, args.b, 8462, args.slots), 8462)}
    try:
        for port in (8461, 8462):  # warm-up
            load(port, 2, 4)
        got = {"A": [], "B": []}
        for r in range(args.rounds):
            for side in ("A", "B") if r % 2 == 0 else ("B", "A"):
                got[side].append(load(servers[side][1], args.clients, args.requests))
        ratios = [a / b for a, b in zip(got["A"], got["B"])]
        print(f"A [{args.a}]: {' '.join(f'{x:.0f}' for x in got['A'])} tok/s")
        print(f"B [{args.b}]: {' '.join(f'{x:.0f}' for x in got['B'])} tok/s")
        print(f"A / B at {args.clients} clients: median {statistics.median(ratios):.2f}x "
              f"(per round {min(ratios):.2f}-{max(ratios):.2f})")
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=30)


if __name__ == "__main__":
    main()
