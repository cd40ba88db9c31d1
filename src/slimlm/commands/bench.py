"""`slimlm bench MODEL`: time to first token, prefill and decode tokens/s, achieved GB/s, peak memory."""

from __future__ import annotations

import argparse

from slimlm.commands._common import int_list, print_json, print_table, quiet_libraries


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face model folder, or 'demo'")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", type=int_list, default=(1, 4), help="decode batch sizes, e.g. 1,4,8")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure (the median is reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from slimlm.api import bench, load

    model, _ = load(args.model)
    result = bench(model, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                   batch_sizes=args.batch_sizes, repeats=args.repeats, warmup=args.warmup)
    if args.json:
        print_json(result.to_dict())
        return 0
    row = {"TTFT ms": f"{result.ttft_ms:.1f}", "prefill tok/s": f"{result.prefill_tps:.0f}"}
    row.update({f"decode b{b} tok/s": f"{t:.1f}" for b, t in result.decode_tps.items()})
    row.update({"GB/s": f"{result.decode_gbps:.2f}", "peak +MB": f"{result.peak_memory_bytes / 1e6:.1f}"})
    print_table([row], title=f"slimlm bench: {args.model} ({args.prompt_tokens} prompt, {args.new_tokens} new tokens)")
    return 0
