"""Quality and speed of pruning methods on one model: magnitude / Wanda / SparseGPT at 50% and 2:4,
random as the floor, and structured removal of 25% of MLP channels, 25% of attention heads and one
block in five, with the decode speed of the structurally pruned models against the dense one.

    python benchmarks/pruning_quality.py --model demo
    python benchmarks/pruning_quality.py --model ../shared/eval-data/hf/stories260K \\
        --data ../shared/eval-data/corpora/tinystories_valid_first1000.txt --calib-docs 0:200 --eval-docs 500:

Calibration and evaluation use disjoint document ranges of --data. Perplexity, KL and top-1
agreement against the dense fp32 model, the measured sparsity or parameter count, and decode
tokens/s (batch 1, the engine; dense and pruned interleaved) for the structured variants.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import slimlm
from slimlm.core.data import load_tokens
from slimlm.eval.perplexity import evaluate_quality
from pruning_speed import decode_tps  # noqa: E402  (benchmarks/ is the script's folder)

VARIANTS = [
    ("random 50%", "random", dict(sparsity=0.5)),
    ("magnitude 50%", "magnitude", dict(sparsity=0.5)),
    ("wanda 50%", "wanda", dict(sparsity=0.5)),
    ("sparsegpt 50%", "sparsegpt", dict(sparsity=0.5)),
    ("magnitude 2:4", "magnitude", dict(pattern="2:4")),
    ("wanda 2:4", "wanda", dict(pattern="2:4")),
    ("sparsegpt 2:4", "sparsegpt", dict(pattern="2:4")),
    ("taylor 50%", "taylor", dict(sparsity=0.5)),
    ("channels 25% magnitude", "channels", dict(sparsity=0.25, importance="magnitude")),
    ("channels 25% activation", "channels", dict(sparsity=0.25, importance="activation")),
    ("channels 25% gradient", "channels", dict(sparsity=0.25, importance="gradient")),
    ("channels 25% activation global", "channels", dict(sparsity=0.25, importance="activation", scope="global")),
    ("heads 25% magnitude", "heads", dict(sparsity=0.25, importance="magnitude")),
    ("heads 25% activation", "heads", dict(sparsity=0.25, importance="activation")),
    ("blocks 1 of 5", "blocks", dict(sparsity=0.2)),
]
STRUCTURED = ("channels", "heads", "blocks")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--data", default="demo")
    p.add_argument("--calib-docs", default="0:20")
    p.add_argument("--eval-docs", default="20:")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--max-eval-tokens", type=int, default=50_000)
    p.add_argument("--repeats", type=int, default=5, help="interleaved speed rounds per structured variant")
    p.add_argument("--only", default=None, help="comma-separated substrings of variant names to run")
    args = p.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    dense, tok = slimlm.load(args.model, dtype="float32")
    calib = load_tokens(f"{args.data}@{args.calib_docs}", tok)
    evaluation = load_tokens(f"{args.data}@{args.eval_docs}", tok, args.max_eval_tokens)
    base = evaluate_quality(dense, evaluation, max_length=args.window)
    params = sum(p.numel() for p in dense.parameters())
    print(f"model {args.model}: {params / 1e6:.2f}M parameters, calibration docs {args.calib_docs}, evaluation "
          f"{evaluation.numel()} tokens (docs {args.eval_docs}), window {args.window}, threads {torch.get_num_threads()}")
    print(f"{'variant':<26} {'ppl':>9} {'Δppl':>8} {'KL':>8} {'top-1':>7} {'prune s':>8}  {'size / speed'}")
    print(f"{'dense fp32':<26} {base.perplexity:>9.4f} {'':>8} {0:>8.4f} {100:>6.2f}%")
    for name, method, settings in VARIANTS:
        if args.only and not any(s in name for s in args.only.split(",")):
            continue
        model, _ = slimlm.load(args.model, dtype="float32")
        t0 = time.perf_counter()
        slimlm.prune(model, method, calibration=calib, n_samples=args.n_samples, seq_len=args.seq_len, **settings)
        seconds = time.perf_counter() - t0
        q = evaluate_quality(model, evaluation, dense, max_length=args.window)
        if method in STRUCTURED:
            kept = sum(p.numel() for p in model.parameters()) / params
            ours, theirs = [], []
            decode_tps(model, 8), decode_tps(dense, 8)  # warm-up
            for _ in range(args.repeats):
                ours.append(decode_tps(model, 64))
                theirs.append(decode_tps(dense, 64))
            extra = (f"{100 * kept:.0f}% of parameters; decode {statistics.median(ours):.0f} vs dense "
                     f"{statistics.median(theirs):.0f} tok/s ({statistics.median(ours) / statistics.median(theirs):.2f}x)")
        else:
            extra = f"sparsity {model.config.slimlm_sparsity['sparsity']:.2f}"
        dppl = 100 * (q.perplexity - base.perplexity) / base.perplexity
        print(f"{name:<26} {q.perplexity:>9.4f} {dppl:>+7.1f}% {q.kl:>8.4f} {100 * q.top1:>6.2f}% {seconds:>8.2f}  {extra}",
              flush=True)


if __name__ == "__main__":
    main()
