"""Quality of quantization methods on one model: RTN vs GPTQ vs AWQ at int4/int3, SmoothQuant W8A8,
fp8 and logarithmic formats.

    python benchmarks/quantization_quality.py --model demo
    python benchmarks/quantization_quality.py --model ../shared/eval-data/hf/stories260K \\
        --data ../shared/eval-data/corpora/tinystories_valid_first1000.txt --calib-docs 0:200 --eval-docs 500:

Calibration and evaluation use disjoint document ranges of --data. Prints one row per variant:
perplexity, KL and top-1 agreement against the fp32 model, the wall-clock time to quantize and the
peak RSS growth while quantizing, and for calibrated methods how much of RTN's KL gap they close.
"""

from __future__ import annotations

import argparse
import time

import torch

import slimlm
from slimlm.core.data import load_tokens
from slimlm.eval.memory import PeakMemory
from slimlm.eval.perplexity import evaluate_quality

PLAIN = dict(act_order=False, clip_search=False)  # the paper's settings; slimlm's defaults add both
VARIANTS = [
    ("rtn int4 g32", "rtn", dict(bits=4, group_size=32)),
    ("gptq int4 g32 plain", "gptq", dict(bits=4, group_size=32, **PLAIN)),
    ("gptq int4 g32", "gptq", dict(bits=4, group_size=32)),
    ("awq int4 g32", "awq", dict(bits=4, group_size=32)),
    ("rtn int4 per-channel", "rtn", dict(bits=4, group_size=None)),
    ("gptq int4 per-channel plain", "gptq", dict(bits=4, group_size=None, **PLAIN)),
    ("gptq int4 per-channel", "gptq", dict(bits=4, group_size=None)),
    ("awq int4 per-channel", "awq", dict(bits=4, group_size=None)),
    ("rtn int3 g32", "rtn", dict(bits=3, group_size=32)),
    ("gptq int3 g32 plain", "gptq", dict(bits=3, group_size=32, **PLAIN)),
    ("gptq int3 g32", "gptq", dict(bits=3, group_size=32)),
    ("awq int3 g32", "awq", dict(bits=3, group_size=32)),
    ("rtn int8 per-channel", "rtn", dict(bits=8, group_size=None, symmetric=True)),
    ("w8a8 unsmoothed", "smoothquant", dict(smooth=False)),
    ("smoothquant w8a8 a0.5", "smoothquant", dict(alpha=0.5)),
    ("smoothquant w8a8 a0.8", "smoothquant", dict(alpha=0.8)),
    ("rtn fp8 per-channel", "rtn", dict(format="fp8", bits=8, group_size=None, symmetric=True)),
    ("rtn log4 g32", "rtn", dict(format="log", bits=4, group_size=32, symmetric=True)),
    ("gptq log4 g32", "gptq", dict(format="log", bits=4, group_size=32, symmetric=True)),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--data", default="demo")
    p.add_argument("--calib-docs", default="0:20", help="document range used for calibration")
    p.add_argument("--eval-docs", default="20:", help="document range used for evaluation")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening")
    p.add_argument("--max-eval-tokens", type=int, default=50_000)
    p.add_argument("--only", default=None, help="comma-separated substrings of variant names to run")
    args = p.parse_args()

    import transformers

    transformers.utils.logging.disable_progress_bar()
    reference, tok = slimlm.load(args.model, dtype="float32")
    calib = load_tokens(f"{args.data}@{args.calib_docs}", tok)
    evaluation = load_tokens(f"{args.data}@{args.eval_docs}", tok, args.max_eval_tokens)
    base = evaluate_quality(reference, evaluation, max_length=args.window)
    print(f"model {args.model}: calibration {calib.numel()} tokens (docs {args.calib_docs}), "
          f"evaluation {evaluation.numel()} tokens (docs {args.eval_docs}), window {args.window}, "
          f"{args.n_samples} x {args.seq_len} calibration windows, threads {torch.get_num_threads()}")
    print(f"{'variant':<34} {'ppl':>9} {'Δppl':>8} {'KL':>9} {'top-1':>7} {'quant s':>8} {'peak MB':>8}  gap closed")
    print(f"{'fp32':<34} {base.perplexity:>9.4f} {'':>8} {0:>9.5f} {100:>6.2f}%")
    rtn_kl = {}
    for name, method, settings in VARIANTS:
        if args.only and not any(s in name for s in args.only.split(",")):
            continue
        model, _ = slimlm.load(args.model, dtype="float32")
        extra = dict(calibration=calib, n_samples=args.n_samples, seq_len=args.seq_len) if method != "rtn" else {}
        if method == "gptq":
            extra["damp"] = args.damp
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            slimlm.quantize(model, method, **settings, **extra)
            seconds = time.perf_counter() - t0
        q = evaluate_quality(model, evaluation, reference, max_length=args.window)
        key = name.replace(method, "").replace("plain", "").strip()
        note = ""
        if method == "rtn":
            rtn_kl[key] = (q.kl, q.perplexity)
        elif key in rtn_kl:
            kl0, ppl0 = rtn_kl[key]
            note = f"KL {100 * (1 - q.kl / kl0):.0f}%, ppl {100 * (ppl0 - q.perplexity) / (ppl0 - base.perplexity):.0f}%"
        dppl = 100 * (q.perplexity - base.perplexity) / base.perplexity
        print(f"{name:<34} {q.perplexity:>9.4f} {dppl:>+7.2f}% {q.kl:>9.5f} {100 * q.top1:>6.2f}% {seconds:>8.2f} "
              f"{mem.peak_bytes / 1e6:>8.1f}  {note}", flush=True)


if __name__ == "__main__":
    main()
