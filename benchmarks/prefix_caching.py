"""Prefix caching in the server's scheduler: time to first token with a cached prompt prefix, and the
throughput of a chat workload whose requests all share a system prompt.

    python benchmarks/prefix_caching.py [--model FOLDER|demo|tinyllama] [--prefix 1000 --rounds 3]

1. Time to first token. Each round a request with a new random `--prefix`-token prompt runs to the
   end (its blocks stay in the prefix cache); then, alternating in order, a request starting with that
   prefix and one starting with a new prefix of the same length, each followed by 8 more tokens and
   asking for one token. Medians over the rounds.
2. Chat workload. `--requests` requests, `--slots` at a time, each a `--system`-token system prompt
   shared by all plus a `--user`-token message of its own, each generating `--new` tokens greedily;
   run with prefix caching on and off, alternating, `--rounds` times: the median wall time and
   generated tokens per second of each.
`--model tinyllama` is TinyLlama-1.1B's shape with random bfloat16 weights (benchmarks/engine_speed.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import slimlm
from slimlm.engine.sampling import SamplingParams
from slimlm.server.scheduler import Request, Scheduler


def load(name: str):
    if name == "tinyllama":
        sys.path.insert(0, str(Path(__file__).parent))
        from engine_speed import build

        return build(22).to(torch.bfloat16)
    return slimlm.load(name)[0]


def wait(r: Request) -> float:
    """Seconds from now to r's first token (r already submitted), after r is done."""
    t, first = time.perf_counter(), float("nan")
    while True:
        event = r.events.get()
        if event[0] == "token" and first != first:
            first = time.perf_counter() - t
        if event[0] == "done":
            return first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--prefix", type=int, default=1000)
    p.add_argument("--system", type=int, default=512)
    p.add_argument("--user", type=int, default=32)
    p.add_argument("--new", type=int, default=16)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip", default="", help="ttft or chat: leave that part out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load(args.model)
    vocab = model.get_input_embeddings().num_embeddings
    context = getattr(model.config, "max_position_embeddings", 10**6)
    max_len = min(max(args.prefix + 16, args.system + args.user + args.new + 8), context)

    def ids(seed: int, n: int) -> list[int]:
        return [int(t) for t in torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))]

    if "ttft" not in args.skip:
        sched = Scheduler(model, slots=4, max_len=max_len, prefill_chunk=256)
        times: dict[str, list[float]] = {"cached": [], "new": []}
        try:
            for rnd in range(args.rounds):
                prefix = ids(100 + rnd, args.prefix)
                sched.submit(first := Request(prefix + [5], SamplingParams(max_new_tokens=4)))
                wait(first)
                for kind in (["cached", "new"] if rnd % 2 == 0 else ["new", "cached"]):
                    head = prefix if kind == "cached" else ids(500 + rnd, args.prefix)
                    r = Request(head + ids(7 + rnd, 8), SamplingParams(max_new_tokens=1))
                    sched.submit(r)
                    times[kind].append(wait(r))
            cached, new = statistics.median(times["cached"]), statistics.median(times["new"])
            print(f"{args.model}, {args.prefix}-token prefix, {args.rounds} rounds: time to first token "
                  f"{1e3 * cached:.0f} ms cached, {1e3 * new:.0f} ms new ({new / cached:.1f}x); "
                  f"{sched.stats()['shared_prefix_tokens']} prompt tokens from the cache")
        finally:
            sched.close()

    if "chat" not in args.skip:
        system = ids(1, args.system)
        prompts = [system + ids(1000 + i, args.user) for i in range(args.requests)]
        runs: dict[bool, list[float]] = {True: [], False: []}
        for rnd in range(args.rounds):
            for caching in ([True, False] if rnd % 2 == 0 else [False, True]):
                sched = Scheduler(model, slots=args.slots, max_len=max_len, max_queue=args.requests,
                                  prefix_caching=caching)
                try:
                    requests = [Request(p, SamplingParams(max_new_tokens=args.new))
                                for p in prompts]
                    t = time.perf_counter()
                    for r in requests:
                        sched.submit(r)
                    for r in requests:
                        wait(r)
                    runs[caching].append(time.perf_counter() - t)
                    assert all(len(r.generated) == args.new for r in requests)
                finally:
                    sched.close()
        tokens = args.requests * args.new
        on, off = statistics.median(runs[True]), statistics.median(runs[False])
        print(f"chat workload: {args.requests} requests ({args.slots} at a time), {args.system}-token system prompt "
              f"+ {args.user}-token message, {args.new} new tokens each; median of {args.rounds} alternating rounds:")
        print(f"  prefix caching on:  {on:.2f} s, {tokens / on:.1f} generated tokens/s")
        print(f"  prefix caching off: {off:.2f} s, {tokens / off:.1f} generated tokens/s  ({off / on:.2f}x)")


if __name__ == "__main__":
    main()
