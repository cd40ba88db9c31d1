"""Parallel inference on this machine: tensor parallelism (TP=2, one thread per rank) and pipeline
parallelism (PP=2) against one process with two threads, and 2 serving replicas x 1 thread against
1 x 2 threads, on a TinyLlama-1.1B-shaped random model (bf16 and int4 g32 + int4 head).

    python benchmarks/parallel_speed.py [--layers 22 --variants bf16,int4 --rounds 2 --new-tokens 32]

Layouts are run alternately in rounds (so the machine's bandwidth swings hit them alike); medians over
rounds. Per layout: decode tokens/s at batch 1 and 16, prefill tokens/s (128-token prompt), peak
memory of each process (VmHWM), and for TP the time rank 0 spent in collectives per decoded token.
Next to each figure, the cost model's prediction (`parallel/cost.py`) from the one-process runs: a
device is one thread (its achieved bandwidth in the 1-thread run), the link is gloo on loopback
(its all-reduce latency measured between idle processes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import slimlm


def build(layers: int, variant: str, folder: Path) -> Path:
    from engine_speed import build as build_model

    model = build_model(layers)
    slimlm.quantize(model, "cast", dtype="bfloat16")
    if variant == "int4":
        slimlm.quantize(model, "rtn", bits=4, group_size=32, include=["*", "lm_head"])
    from slimlm.testing import tiny_tokenizer

    return slimlm.save(model, folder / variant, tiny_tokenizer(), format="slimlm")


def peak_mb(pid: int | None = None) -> float:
    """Peak resident memory of a process (VmHWM; unlike ru_maxrss it does not carry over an exec, so a
    process started from a big parent reports its own peak)."""
    for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def anon_mb(pid: int | None = None) -> float:
    """Private memory the process holds now (RssAnon: not the file pages of the mmap'd weights)."""
    for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def collective_latency() -> float:
    """Seconds per gloo all-reduce of one hidden state (2048 bf16) between two idle 1-thread processes."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(Path(__file__).parent / "parallel_speed.py"), "--latency-probe"],
                         capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def _probe(rank: int, port: int) -> None:
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    x = torch.ones(2048, dtype=torch.bfloat16)
    for _ in range(50):
        dist.all_reduce(x)
    t0 = time.perf_counter()
    for _ in range(300):
        dist.all_reduce(x)
    if rank == 0:
        print(json.dumps({"seconds": (time.perf_counter() - t0) / 300}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def predictions(layers: int, variant: str, rows: dict, alpha: float) -> dict:
    """The cost model's tokens/s for each layout, from the one-process figures: a device is one thread
    (the 1-thread run's achieved bandwidth), the link is gloo on loopback (latency `alpha`)."""
    from slimlm.parallel.cost import Device, Layout, Link, ModelShape, SHAPES, predict

    shape = ModelShape(**{**SHAPES["tinyllama-1.1b"].__dict__, "layers": layers})
    bits = 16.0 if variant == "bf16" else 4.5
    shape = ModelShape(**{**shape.__dict__, "weight_bits": bits, "head_bits": bits})
    one_thread = statistics.median(r["gbps"] for r in rows["single1"])
    two_threads = statistics.median(r["gbps"] for r in rows["single"])
    link = Link(bandwidth_gbs=2.0, latency_us=alpha * 1e6)
    out = {}
    for name, layout, bandwidth in (("single", Layout(1, 1, 1), two_threads), ("single1", Layout(1, 1, 1), one_thread),
                                    ("tp", Layout(2, 1, 1), one_thread), ("pp", Layout(1, 2, 1), one_thread)):
        device = Device(memory_gb=24, bandwidth_gbs=bandwidth, tflops=0.2, layer_overhead_us=70)
        b1 = predict(shape, device, link, layout, batch=1, context=160)
        b16 = predict(shape, device, link, layout, batch=16, context=160)
        out[name] = (1e3 / b1.latency_ms, b16.throughput)
    return out


def run_layout(path: Path, layout: str, args) -> dict:
    """Measure one layout in a fresh process (so peak memory is its own)."""
    import json
    import subprocess
    import sys

    code = f"""
import json, sys, time, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from parallel_speed import measure
print("RESULT " + json.dumps(measure({str(path)!r}, {layout!r}, {args.new_tokens}, {args.repeats})))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(out.stderr[-3000:])


def measure(path: str, layout: str, new_tokens: int, repeats: int) -> dict:
    torch.set_num_threads(1 if layout == "single1" else 2)
    settings = {"tp": 2} if layout == "tp" else {"pp": 2} if layout == "pp" else {}
    t0 = time.perf_counter()
    model, _ = slimlm.load(path, **settings)
    load_s = time.perf_counter() - t0
    result = slimlm.bench(model, prompt_tokens=128, new_tokens=new_tokens, batch_sizes=(1, 16), repeats=repeats)
    out = {"layout": layout, "load_s": load_s, "prefill": result.prefill_tps,
           "b1": result.decode_tps[1], "b16": result.decode_tps[16], "bandwidth": result.bandwidth_gbps,
           "gbps": result.decode_gbps, "peak_mb": [peak_mb()], "anon_mb": [anon_mb()]}
    group = getattr(model, "slimlm_parallel", None)
    if group is not None:
        comm = getattr(model, "slimlm_comm", None)
        if comm is not None:  # rank 0's time in collectives over decode steps at batch 1
            engine = group.engine(slots=1, max_len=160)
            token = engine.prefill(0, torch.randint(0, 1000, (128,))).argmax(-1)[None]
            comm.seconds, steps = 0.0, 16
            t0 = time.perf_counter()
            for _ in range(steps):
                token = engine.decode(torch.tensor([0]), token).argmax(-1)
            out["step_ms"] = 1e3 * (time.perf_counter() - t0) / steps
            out["comm_ms_per_step"] = 1e3 * comm.seconds / steps
            engine.close()
        out["peak_mb"] += [peak_mb(p.pid) for p in group.workers.processes]
        out["anon_mb"] += [anon_mb(p.pid) for p in group.workers.processes]
        group.close()
    return out


def serve_replicas(path: Path, replicas: int, clients: int, requests: int) -> dict:
    from slimlm.server.load_test_client import run_load
    from slimlm.server.server import BackgroundServer, build_app
    from slimlm.server.state import ServeSettings

    app, models = build_app(str(path), ServeSettings(), slots=16 // replicas, max_len=256, replicas=replicas)
    try:
        with BackgroundServer(app) as url:
            run_load(url, 2, 4)  # warm-up
            return run_load(url, clients, requests)
    finally:
        for m in models.values():
            m.scheduler.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--variants", default="bf16,int4")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--layouts", default="single,single1,tp,pp")
    p.add_argument("--latency-probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--replicas", action="store_true", help="also 2 replicas x 1 thread vs 1 x 2 threads, 16 clients")
    args = p.parse_args()
    if args.latency_probe:
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.spawn(_probe, args=(port,), nprocs=2)
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as scratch:
        for variant in args.variants.split(","):
            path = build(args.layers, variant, Path(scratch))
            rows: dict[str, list[dict]] = {}
            for _ in range(args.rounds):
                for layout in args.layouts.split(","):
                    rows.setdefault(layout, []).append(run_layout(path, layout, args))
            alpha = collective_latency()
            model = predictions(args.layers, variant, rows, alpha) if {"single", "single1"} <= set(rows) else {}
            print(f"\n{variant}, {args.layers} layers, medians of {args.rounds} rounds (alternating); gloo all-reduce "
                  f"of a hidden state between idle processes: {1e3 * alpha:.2f} ms")
            print(f"{'layout':<8} {'b1 tok/s':>9} {'model':>6} {'b16 tok/s':>10} {'model':>6} {'prefill':>8} "
                  f"{'comm ms/step':>13} {'private MB per process':>23} {'peak RSS MB':>12} {'b1 vs single':>13}")
            base = statistics.median(r["b1"] for r in rows["single"]) if "single" in rows else None
            for layout, results in rows.items():
                med = {k: statistics.median(r[k] for r in results) for k in ("b1", "b16", "prefill", "load_s")}
                comm = statistics.median(r.get("comm_ms_per_step", float("nan")) for r in results)
                anon = "/".join(f"{v:.0f}" for v in results[-1]["anon_mb"])
                peaks = "/".join(f"{v:.0f}" for v in results[-1]["peak_mb"])
                ratio = f"{med['b1'] / base:.2f}x" if base else ""
                pred = model.get(layout, (float("nan"), float("nan")))
                print(f"{layout:<8} {med['b1']:>9.1f} {pred[0]:>6.1f} {med['b16']:>10.1f} {pred[1]:>6.1f} "
                      f"{med['prefill']:>8.0f} {comm:>13.2f} {anon:>23} {peaks:>12} {ratio:>13}", flush=True)
            if args.replicas:
                for replicas in (1, 2, 1, 2):
                    r = serve_replicas(path, replicas, 16, 32)
                    print(f"serve {replicas} replica(s) x {2 // replicas} thread(s), 16 clients: {r['tok_s']:.1f} tok/s, "
                          f"TTFT p50 {1e3 * r['ttft_p50']:.0f} ms, ITL p50 {1e3 * r['itl_p50']:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
