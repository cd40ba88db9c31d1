"""Load test of `slimlm serve` on loopback: N concurrent streaming clients with a fixed mix of prompt
and response lengths; total output tokens/s, time to first token and inter-token latency (p50/p99)
at each concurrency, for continuous batching (--slots) and for the same load served one request at
a time (1 slot). `slimlm bench MODEL --serve` runs the same.

    python benchmarks/serve_load.py --model demo [--quantize int4 --concurrency 1,4,16,64 --slots 16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import slimlm
from slimlm.server.load_test_client import LENGTHS, compare_batching


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--quantize", default=None, help="int4: serve an RTN int4 g32 copy")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--in-process", action="store_true", help="the engine in the server's process "
                   "(`slimlm serve --no-engine-process`)")
    p.add_argument("--requests", type=int, default=0, help="requests per level (default 2 x concurrency, at least 8)")
    args = p.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model, tok = slimlm.load(args.model)
    source = args.model
    if args.quantize == "int4":  # saved, so the engine process (as `slimlm serve` runs it) loads it
        import tempfile

        slimlm.quantize(model, "rtn", bits=4, group_size=32)
        source = str(Path(tempfile.mkdtemp(prefix="slimlm-serve-load-")) / "int4")
        slimlm.save(model, source, tok)
    print(f"model {args.model}{' ' + args.quantize if args.quantize else ''}; prompts of 3-8 tokens, "
          f"max_tokens mix {LENGTHS}, greedy, streaming")
    print(f"{'server':<22} {'clients':>7} {'tok/s':>8} {'TTFT p50':>9} {'p99':>8} {'ITL p50':>8} {'p99':>8}")

    def show(r):
        print(f"{r['server']:<22} {r['clients']:>7} {r['tok_s']:>8.1f} {1e3 * r['ttft_p50']:>7.0f}ms "
              f"{1e3 * r['ttft_p99']:>6.0f}ms {1e3 * r['itl_p50']:>6.1f}ms {1e3 * r['itl_p99']:>6.1f}ms", flush=True)

    compare_batching(model, tok, [int(c) for c in args.concurrency.split(",")], args.slots, args.requests, show,
                     source=None if args.in_process else source)


if __name__ == "__main__":
    main()
