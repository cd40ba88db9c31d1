"""`slimlm bench MODEL`: time to first token, prefill and decode tokens/s, achieved GB/s and its share
of the measured memory bandwidth, peak memory; `--baseline` also times the model's own forward
(transformers) in the same process, for a ratio."""

from __future__ import annotations

import argparse

from slimlm.commands._common import print_json, print_table, quiet_libraries
from slimlm.commands._flags import add_config_flags, int_list, settings_from_args


def bench_settings():
    from slimlm import BenchSettings

    return BenchSettings


def parallel_config():
    from slimlm import ParallelConfig

    return ParallelConfig


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face model folder, or 'demo'")
    add_config_flags(p, [bench_settings()])
    add_config_flags(p.add_argument_group("parallelism (starts its own worker processes; torchrun works too)"),
                     [parallel_config()])
    p.add_argument("--baseline", action="store_true", help="also time transformers' forward and print the ratio")
    p.add_argument("--serve", action="store_true",
                   help="load-test an OpenAI-compatible server on loopback instead: streaming clients at "
                        "--concurrency, continuous batching vs one request at a time")
    p.add_argument("--concurrency", type=int_list, default=(1, 4, 16, 64), help="with --serve: concurrent clients")
    p.add_argument("--slots", type=int, default=16, help="with --serve: sequences batched together")
    p.add_argument("--no-engine-process", action="store_true",
                   help="with --serve: run the engine in the server's process (`slimlm serve --no-engine-process`)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--json", action="store_true")


def _row(name: str, result) -> dict:
    row = {"runtime": name, "TTFT ms": f"{result.ttft_ms:.1f}", "prefill tok/s": f"{result.prefill_tps:.0f}"}
    row.update({f"decode b{b} tok/s": f"{t:.1f}" for b, t in result.decode_tps.items()})
    row.update({"GB/s": f"{result.decode_gbps:.2f}", "% of mem BW": f"{100 * result.bandwidth_share:.0f}%",
                "peak +MB": f"{result.peak_memory_bytes / 1e6:.1f}"})
    return row


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from slimlm.api import bench, load

    from slimlm.core.errors import SlimError

    settings = settings_from_args(args, bench_settings())
    parallel = parallel_config().from_dict(settings_from_args(args, parallel_config()))
    if parallel.parallel and (args.baseline or args.serve or settings.get("engine") is False):
        raise SlimError("--baseline, --serve and --no-engine run in one process; drop --tp/--pp for them")
    if args.device.split(":")[0] not in ("cpu", "cuda"):
        raise SlimError(f"device {args.device!r} must be cpu or cuda (--device)")
    if args.device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise SlimError(f"--device {args.device}: this machine has no CUDA device; use --device cpu")
    model, tokenizer = load(args.model, tp=parallel.tp, pp=parallel.pp, split_head=parallel.split_head,
                           micro_batches=parallel.micro_batches, device=args.device)
    if args.serve:
        return _serve_load(args, model, tokenizer, settings)
    try:
        result = bench(model, **settings)
    finally:
        if parallel.parallel:
            model.slimlm_parallel.close()
    baseline = bench(model, **{**settings, "engine": False}) if args.baseline and result.runtime == "engine" else None
    if args.json:
        print_json({**result.to_dict(), "baseline": baseline.to_dict() if baseline else None})
        return 0
    rows = [_row(result.runtime, result)]
    if baseline:
        rows.append(_row("transformers", baseline))
        ratio = {k: f"{result.decode_tps[b] / baseline.decode_tps[b]:.2f}x" for b in result.decode_tps
                 for k in [f"decode b{b} tok/s"]}
        rows.append({"runtime": "engine / transformers", "TTFT ms": f"{baseline.ttft_ms / result.ttft_ms:.2f}x",
                     "prefill tok/s": f"{result.prefill_tps / baseline.prefill_tps:.2f}x", **ratio})
    used = result.settings  # the settings in effect (a flag left out is None in args)
    print_table(rows, title=f"slimlm bench: {args.model} ({used['prompt_tokens']} prompt, {used['new_tokens']} new tokens, "
                            f"memory bandwidth {result.bandwidth_gbps:.0f} GB/s)")
    return 0


def _serve_load(args: argparse.Namespace, model, tokenizer, settings: dict) -> int:
    """The server under load, and the engine's own decode at the batch each load level runs (as many
    sequences as clients, at most --slots): served tokens/s as a share of what the engine can do."""
    import torch

    from slimlm.api import bench
    from slimlm.commands.serve import serving_threads
    from slimlm.server.load_test_client import LENGTHS, compare_batching

    every = torch.get_num_threads()
    serving_threads(args.threads, args.device)  # the server as `slimlm serve` runs it
    computing = torch.get_num_threads()  # the engine's compute threads while serving
    batches = sorted({min(c, args.slots) for c in args.concurrency} | {1})

    def engine_tps() -> dict[int, float]:
        return bench(model, **{**settings, "batch_sizes": tuple(batches), "prompt_tokens": 8,
                               "new_tokens": max(LENGTHS)}).decode_tps

    try:
        rows = compare_batching(model, tokenizer, list(args.concurrency), args.slots,
                                source=None if args.no_engine_process else args.model, device=args.device)
        # the engine alone with the threads the server computes on (the rest of the cores serve HTTP)
        alone = engine_tps() if computing != every else None
    finally:
        torch.set_num_threads(every)  # the engine's own figures with every thread
    engine = engine_tps()
    for r in rows:
        batch = min(r["clients"], args.slots if r["server"].startswith("continuous") else 1)
        r["engine_tok_s"] = engine[batch]
        r["served_share"] = r["tok_s"] / engine[batch]
        r["engine_threads"], r["server_compute_threads"] = every, computing
        if alone is not None:
            r["engine_tok_s_server_threads"] = alone[batch]
            r["served_share_server_threads"] = r["tok_s"] / alone[batch]
    if args.json:
        print_json(rows)
        return 0

    def same_threads(r: dict) -> dict:
        if alone is None:
            return {}
        return {f"engine, {computing} thr": f"{r['engine_tok_s_server_threads']:.1f}",
                f"served / engine, {computing} thr": f"{100 * r['served_share_server_threads']:.0f}%"}

    print_table([{"server": r["server"], "clients": str(r["clients"]), "tok/s": f"{r['tok_s']:.1f}",
                  f"engine, {every} thr": f"{r['engine_tok_s']:.1f}", "served / engine": f"{100 * r['served_share']:.0f}%",
                  **same_threads(r),
                  "TTFT p50 ms": f"{1e3 * r['ttft_p50']:.0f}", "TTFT p99 ms": f"{1e3 * r['ttft_p99']:.0f}",
                  "ITL p50 ms": f"{1e3 * r['itl_p50']:.1f}", "ITL p99 ms": f"{1e3 * r['itl_p99']:.1f}"} for r in rows],
                title=f"{args.model} on {args.device}: streaming load on loopback against the engine's own "
                      f"decode at the same batch, on {every} threads" +
                      (f" and on the {computing} the server computes on" if alone is not None else ""))
    return 0
