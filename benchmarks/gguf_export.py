"""GGUF export measured: sizes, perplexity with slimlm and with llama.cpp on the same tokens, decode
speed of llama.cpp on the GGUF against slimlm's engine on the folder (alternated in rounds), and for
the TinyLlama-1.1B shape the export's time and peak memory.

    python benchmarks/gguf_export.py --model ../shared/eval-data/hf/stories260K \\
        --data ../shared/eval-data/corpora/tinystories_valid_first1000.txt --calib-docs 0:200 --eval-docs 500:
    python benchmarks/gguf_export.py --tinyllama        # the 1.1B shape (random weights)

stories260K: GPTQ int4 g32, symmetric (→ Q4_0) and asymmetric (→ Q4_1, slimlm's default), saved by
`slimlm.save` and exported by `slimlm export` (its MLP width, 172, is not a multiple of 32, so the
down projections need `--type`: they are written as F16). Perplexity: the held-out text in
non-overlapping windows of the model's context, the same token ids fed to both (slimlm's tokenizer),
next-token NLL averaged over every predicted position. Speed: batch 1, greedy, threads as given;
llama.cpp through llama-cpp-python's generate loop.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import slimlm
from slimlm.core.data import load_tokens
from slimlm.core.files import folder_bytes


def nll_slimlm(model, windows: torch.Tensor) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            logits = model(row[None]).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum").item()
            count += row.numel() - 1
    return total / count


def nll_llama_cpp(llm, windows: torch.Tensor) -> float:
    total, count = 0.0, 0
    for row in windows:
        ids = row.tolist()
        llm.reset()
        llm.eval(ids)
        logits = torch.tensor(llm.scores[: len(ids) - 1], dtype=torch.float32)
        total += torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum").item()
        count += len(ids) - 1
    return total / count


def llama_cpp_decode_tps(llm, prompt: list[int], new_tokens: int) -> float:
    llm.reset()
    gen = llm.generate(prompt, temp=0.0, top_k=1, reset=True)
    next(gen)  # the prompt's prefill and the first token
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        next(gen)
    return new_tokens / (time.perf_counter() - t0)


def export(folder: Path, out: Path, *extra: str) -> tuple[float, float, str]:
    """Run `slimlm export` in a fresh process: seconds, its peak RSS in MB (VmHWM), its summary line."""
    code = ("import sys, time; from slimlm.cli import main; t0 = time.perf_counter(); "
            f"rc = main({['export', str(folder), '-o', str(out), '--overwrite', *extra]!r}); "
            "dt = time.perf_counter() - t0; "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
            "print(f'RESULT {dt} {int(hwm) / 1024}'); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    result = next(line for line in p.stdout.splitlines() if line.startswith("RESULT")).split()
    summary = next(line for line in p.stdout.splitlines() if line.startswith("wrote"))
    return float(result[1]), float(result[2]), summary


def stories(args) -> None:
    import llama_cpp

    scratch = Path(tempfile.mkdtemp(dir=os.environ.get("TMPDIR", "/tmp")))
    base, tok = slimlm.load(args.model)
    calib = load_tokens(f"{args.data}@{args.calib_docs}", tok)
    text = load_tokens(f"{args.data}@{args.eval_docs}", tok, max_tokens=args.max_eval_tokens)
    window = base.config.max_position_embeddings
    windows = text[: text.numel() // window * window].view(-1, window)
    print(f"{args.model}: {windows.numel()} held-out tokens in {len(windows)} windows of {window}")
    print(f"fp32 slimlm perplexity {math.exp(nll_slimlm(base, windows)):.3f}")
    rows = []
    for label, symmetric in (("int4 g32 sym -> Q4_0", True), ("int4 g32 asym -> Q4_1", False)):
        model, _ = slimlm.load(args.model)
        slimlm.quantize(model, "gptq", tokenizer=tok, calibration=calib, bits=4, group_size=32, symmetric=symmetric,
                        n_samples=args.n_samples, seq_len=args.seq_len)
        folder = slimlm.save(model, scratch / label.split()[2], tok)
        gguf = scratch / f"{label.split()[2]}.gguf"
        seconds, peak, summary = export(folder, gguf, "--type", "f16")
        model, _ = slimlm.load(folder)
        llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=window, n_batch=window, logits_all=True,
                              n_threads=args.threads, verbose=False)
        ppl_slimlm, ppl_cpp = math.exp(nll_slimlm(model, windows)), math.exp(nll_llama_cpp(llm, windows))
        sample = Path(args.data).read_text()[:20000]
        same = llm.tokenize(sample.encode(), add_bos=False) == tok(sample, add_special_tokens=False)["input_ids"]
        del llm
        speeds = {"slimlm": [], "llama.cpp": []}
        gen_llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=window, n_threads=args.threads, verbose=False)
        prompt = text[:16].tolist()
        for _ in range(args.rounds):
            torch.set_num_threads(args.threads)
            r = slimlm.bench(model, prompt_tokens=16, new_tokens=args.new_tokens, batch_sizes=(1,), repeats=1)
            speeds["slimlm"].append(r.decode_tps[1])
            speeds["llama.cpp"].append(llama_cpp_decode_tps(gen_llm, prompt, args.new_tokens))
        rows.append((label, folder_bytes(folder), gguf.stat().st_size, ppl_slimlm, ppl_cpp, same,
                     statistics.median(speeds["slimlm"]), statistics.median(speeds["llama.cpp"]), seconds, summary))
    print(f"\n{'variant':<22} {'slimlm folder':>13} {'GGUF':>9} {'ppl slimlm':>10} {'ppl llama.cpp':>13} "
          f"{'same tokens':>11} {'slimlm tok/s':>12} {'llama.cpp tok/s':>15} {'export s':>8}")
    for label, fb, gb, p1, p2, same, s1, s2, sec, _ in rows:
        print(f"{label:<22} {fb / 1e3:>10.1f} KB {gb / 1e3:>6.1f} KB {p1:>10.3f} {p2:>13.3f} {str(same):>11} "
              f"{s1:>12.0f} {s2:>15.0f} {sec:>8.1f}")
    for row in rows:
        print(f"  {row[0]}: {row[-1]}")


def tinyllama(args) -> None:
    """The 1.1B shape: export time and peak memory; then llama.cpp's decode speed on the file against
    slimlm's engine on the folder, alternated."""
    import llama_cpp

    sys.path.insert(0, str(Path(__file__).parent))
    from engine_speed import build

    from slimlm.testing import tiny_tokenizer

    scratch = Path(tempfile.mkdtemp(dir=os.environ.get("TMPDIR", "/tmp")))
    model = build(args.layers)
    slimlm.quantize(model, "cast", dtype="bfloat16")
    slimlm.quantize(model, "rtn", bits=4, group_size=32, symmetric=True, include=["*", "lm_head"])
    folder = slimlm.save(model, scratch / "int4", tiny_tokenizer())
    del model
    seconds, peak, summary = export(folder, scratch / "int4.gguf")
    print(f"TinyLlama-1.1B shape, int4 g32 symmetric (+ head): folder {folder_bytes(folder) / 1e6:.0f} MB, "
          f"GGUF {(scratch / 'int4.gguf').stat().st_size / 1e6:.0f} MB; export {seconds:.1f} s, peak RSS {peak:.0f} MB")
    print(f"  {summary}")
    model, _ = slimlm.load(folder)
    llm = llama_cpp.Llama(model_path=str(scratch / "int4.gguf"), n_ctx=512, n_threads=args.threads, verbose=False)
    prompt = list(range(100, 228))
    speeds = {"slimlm": [], "llama.cpp": []}
    for _ in range(args.rounds):
        torch.set_num_threads(args.threads)
        speeds["slimlm"].append(slimlm.bench(model, prompt_tokens=128, new_tokens=args.new_tokens, batch_sizes=(1,),
                                             repeats=1).decode_tps[1])
        speeds["llama.cpp"].append(llama_cpp_decode_tps(llm, prompt, args.new_tokens))
        print(f"  round: slimlm {speeds['slimlm'][-1]:.1f} tok/s, llama.cpp {speeds['llama.cpp'][-1]:.1f} tok/s", flush=True)
    a, b = statistics.median(speeds["slimlm"]), statistics.median(speeds["llama.cpp"])
    print(f"decode batch 1, {args.threads} threads, medians of {args.rounds} alternated rounds: slimlm {a:.1f} tok/s, "
          f"llama.cpp {b:.1f} tok/s (ratio {a / b:.2f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(Path(__file__).resolve().parents[2] / "shared/eval-data/hf/stories260K"))
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/eval-data/corpora/tinystories_valid_first1000.txt"))
    p.add_argument("--calib-docs", default="0:200")
    p.add_argument("--eval-docs", default="500:")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-eval-tokens", type=int, default=50_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--tinyllama", action="store_true", help="the TinyLlama-1.1B shape instead")
    p.add_argument("--layers", type=int, default=22)
    args = p.parse_args()
    tinyllama(args) if args.tinyllama else stories(args)


if __name__ == "__main__":
    main()
