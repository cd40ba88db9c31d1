"""Time to first token with and without a shared prompt prefix in the server's scheduler.

    python benchmarks/prefix_sharing.py --model FOLDER|demo [--prefix 1000 --rounds 3]

Each round, a request holding a random `--prefix`-token prompt runs; then, alternating in order, one
request starting with that prefix (its keys and values copied from the running one) and one with a
new prefix of the same length, each followed by 8 more tokens, and each asking for one token: the
medians of their times to first token.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import slimlm
from slimlm.engine.sampling import SamplingParams
from slimlm.server.scheduler import Request, Scheduler


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--prefix", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = slimlm.load(args.model)
    vocab = model.get_input_embeddings().num_embeddings
    context = getattr(model.config, "max_position_embeddings", 10**6)
    if args.prefix + 80 > context:
        raise SystemExit(f"--prefix {args.prefix} leaves no room in this model's {context}-token context")
    sched = Scheduler(model, slots=4, max_len=min(args.prefix + 300, context), prefill_chunk=256)

    def ids(seed: int, n: int) -> list[int]:
        return [int(t) for t in torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))]

    def ttft(prompt: list[int]) -> float:
        r = Request(prompt, SamplingParams(max_new_tokens=1))
        t = time.perf_counter()
        sched.submit(r)
        first = float("nan")
        while True:
            event = r.events.get()
            if event[0] == "token":
                first = time.perf_counter() - t
            if event[0] == "done":
                return first

    times: dict[str, list[float]] = {"shared": [], "new": []}
    try:
        for rnd in range(args.rounds):
            prefix = ids(100 + rnd, args.prefix)
            holder = Request(prefix + [5], SamplingParams(max_new_tokens=60))
            sched.submit(holder)
            while not holder.generated:
                time.sleep(0.001)
            for kind in (["shared", "new"] if rnd % 2 == 0 else ["new", "shared"]):
                head = prefix if kind == "shared" else ids(500 + rnd, args.prefix)
                times[kind].append(ttft(head + ids(7 + rnd, 8)))
            holder.cancel()
            while holder.finish_reason is None:
                time.sleep(0.001)
        shared, new = statistics.median(times["shared"]), statistics.median(times["new"])
        print(f"{args.model}, {args.prefix}-token prefix, {args.rounds} rounds: time to first token "
              f"{1e3 * shared:.0f} ms shared, {1e3 * new:.0f} ms new ({new / shared:.1f}x); "
              f"{sched.stats()['shared_prefix_tokens']} prompt tokens copied")
    finally:
        sched.close()


if __name__ == "__main__":
    main()
