"""slimlm's int4 and int8 decode against llama.cpp's Q4_0 and Q8_0 on the same model, alternating.

    python benchmarks/llama_cpp.py --llama-bench PATH/llama-bench [--llama-quantize PATH/llama-quantize]
                                   [--threads 2 --rounds 3 --layers 22 --work DIR]

The model is TinyLlama-1.1B-shaped (hidden 2048, intermediate 5632, 22 layers, 32/4 heads, vocab
32000) with random weights, saved in bfloat16. slimlm's variants are made the way a user makes them
(`slimlm quantize FOLDER --bits 4 ...`, default head treatment unless stated) and timed with `slimlm
bench` (batch 1, 128-token prompt, 64 new tokens); llama.cpp's are the bf16 model exported to GGUF f16
by slimlm and quantized by llama.cpp's own `llama-quantize` (Q4_0 keeps its output tensor at Q6_K),
timed by `llama-bench -p 128 -n 64`. Each round runs every pair back to back, slimlm first in even
rounds and llama.cpp first in odd ones, so both see the same machine; the ratio is of the medians,
with the per-round ratios' range. Each run is its own process (weights loaded fresh, load not timed).

Without --llama-bench, the slimlm variants are timed alone and reported against the bandwidth
ceiling (`slimlm bench`'s decode_gbps over its measured read bandwidth).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# label -> (extra `slimlm quantize` flags, the llama.cpp type it is compared with)
VARIANTS = {
    "int4 g32 (head int8, default)": (["--bits", "4", "--group-size", "32"], "Q4_0"),
    "int4 g128 (--bits 4, head int8)": (["--bits", "4"], "Q4_0"),
    # Q4_0's own format: symmetric, a float16 scale per 32 weights, 4.5 bits (asymmetric g32 is 4.75)
    "int4 g32 sym (head int8)": (["--bits", "4", "--group-size", "32", "--symmetric"], "Q4_0"),
    "int4 g32 head int4": (["--bits", "4", "--group-size", "32", "--include", "*", "--include", "lm_head"], "Q4_0"),
    "int4 g32 head float": (["--bits", "4", "--group-size", "32", "--head", "float"], "Q4_0"),
    "int8 asym (--bits 8, per-channel, head int8)": (["--bits", "8"], "Q8_0"),
    "int8 sym (per-channel, head int8)": (["--bits", "8", "--group-size", "none", "--symmetric"], "Q8_0"),
}


def build_folder(out: Path, layers: int) -> None:
    """The bf16 TinyLlama-shaped model with random weights, and the demo tokenizer (padded in GGUF)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from engine_speed import build

    import slimlm
    from slimlm.core.model_io import demo_path, load_tokenizer

    model = build(layers).to(torch.bfloat16)
    slimlm.save(model, out, load_tokenizer(demo_path()), format="slimlm")


def run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def slimlm_bench(folder: Path, threads: int) -> dict[str, float]:
    out = json.loads(run([sys.executable, "-m", "slimlm", "bench", str(folder), "--json", "--batch-sizes", "1",
                          "--repeats", "1", "--warmup", "1", "--threads", str(threads)]))
    return {"decode": out["decode_tps"]["1"], "prefill": out["prefill_tps"], "gbps": out["decode_gbps"],
            "ceiling": out["bandwidth_gbps"], "peak_mb": out["peak_memory_bytes"] / 1e6}


def llama_bench(binary: str, gguf: Path, threads: int) -> dict[str, float]:
    rows = json.loads(run([binary, "-m", str(gguf), "-t", str(threads), "-p", "128", "-n", "64", "-r", "1",
                           "-o", "json"]))
    found = {("prefill" if r["n_prompt"] else "decode"): r["avg_ts"] for r in rows}
    return found


def prepare(work: Path, layers: int, quantize_bin: str | None, variants: list[str]) -> dict[str, Path]:
    """Make the folders and GGUF files (kept in `work`, so a second run reuses them)."""
    bf16 = work / "bf16"
    if not (bf16 / "config.json").exists():
        print("building the bf16 model ...", flush=True)
        build_folder(bf16, layers)
    paths = {}
    for label in variants:
        flags, _ = VARIANTS[label]
        out = work / label.split(" (")[0].replace(" ", "-")
        if not (out / "config.json").exists():
            print(f"slimlm quantize {' '.join(flags)} ...", flush=True)
            run([sys.executable, "-m", "slimlm", "quantize", str(bf16), "-o", str(out), *flags, "--eval-tokens", "0"])
        paths[label] = out
    if quantize_bin:
        f16 = work / "f16.gguf"
        if not f16.exists():
            print("exporting GGUF f16 ...", flush=True)
            run([sys.executable, "-m", "slimlm", "export", str(bf16), "-o", str(f16), "--format", "gguf",
                 "--float-type", "f16"])
        for kind in sorted({VARIANTS[v][1] for v in variants}):
            target = work / f"{kind.lower()}.gguf"
            if not target.exists():
                print(f"llama-quantize {kind} ...", flush=True)
                run([quantize_bin, str(f16), str(target), kind])
            paths[kind] = target
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-bench", default=None, help="llama.cpp's llama-bench binary (else: slimlm alone)")
    p.add_argument("--llama-quantize", default=None, help="llama.cpp's llama-quantize (default: next to llama-bench)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--work", default=None, help="folder for the models (reused across runs; default: a temp dir)")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="slimlm-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    quantize_bin = args.llama_quantize or (str(Path(args.llama_bench).parent / "llama-quantize") if args.llama_bench else None)
    paths = prepare(work, args.layers, quantize_bin, args.variants)

    results: dict[str, list[dict[str, float]]] = {}
    for r in range(args.rounds):
        for label in args.variants:
            kind = VARIANTS[label][1]
            order = [label, kind] if r % 2 == 0 else [kind, label]
            for system in order:
                if system == kind and not args.llama_bench:
                    continue
                got = (llama_bench(args.llama_bench, paths[kind], args.threads) if system == kind
                       else slimlm_bench(paths[label], args.threads))
                results.setdefault(system, []).append(got)
                print(f"round {r + 1} {system}: decode {got['decode']:.1f} tok/s, prefill {got['prefill']:.1f} tok/s",
                      flush=True)

    def med(system: str, key: str) -> float:
        return statistics.median(x[key] for x in results[system])

    print(f"\n{args.threads} threads, batch 1, 128-token prompt, 64 new tokens; medians of {args.rounds} rounds\n")
    print("| slimlm | decode tok/s | llama.cpp | decode tok/s | ratio (range) | prefill ratio | slimlm % of bandwidth ceiling |")
    print("|---|---|---|---|---|---|---|")
    for label in args.variants:
        kind = VARIANTS[label][1]
        ours = results[label]
        share = statistics.median(x["gbps"] / x["ceiling"] for x in ours)
        if args.llama_bench:
            paired = _rounds_of(results, kind, label, args.variants)  # llama.cpp's runs beside this variant's
            ours_d, theirs_d = statistics.median(x["decode"] for x in ours), statistics.median(x["decode"] for x in paired)
            ratios = [a["decode"] / b["decode"] for a, b in zip(ours, paired)]
            prefill = statistics.median(x["prefill"] for x in ours) / statistics.median(x["prefill"] for x in paired)
            print(f"| {label} | {ours_d:.1f} | {kind} | {theirs_d:.1f} | {ours_d / theirs_d:.2f}x "
                  f"({min(ratios):.2f}-{max(ratios):.2f}) | {prefill:.2f}x | {share:.0%} |")
        else:
            print(f"| {label} | {med(label, 'decode'):.1f} | - | - | - | - | {share:.0%} |")
    print(f"\nmodels in {work}")


def _rounds_of(results, kind, label, variants):
    """llama.cpp's run of the same round as each of `label`'s runs (one llama.cpp run per variant per round)."""
    same_kind = [v for v in variants if VARIANTS[v][1] == kind]
    step = len(same_kind)
    index = same_kind.index(label)
    return results[kind][index::step]


if __name__ == "__main__":
    main()
