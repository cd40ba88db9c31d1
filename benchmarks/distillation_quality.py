"""Distillation and recovery fine-tuning on one model, with wall-clock times:

(a) a student with every other block of the teacher, trained for the same steps with distillation
    (soft targets, alpha 0) and without (true tokens only, alpha 1);
(b) int4 and int3 RTN (then quantization-aware training) and 50% magnitude pruning (then fine-tuning
    with the masks fixed), each healed with the dense model as teacher: how much of the lost
    perplexity comes back.

    python benchmarks/distillation_quality.py --model ../shared/eval-data/hf/stories260K \\
        --data ../shared/eval-data/corpora/tinystories_valid_first1000.txt --train-docs 0:800 --eval-docs 800:
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch

import slimlm
from slimlm.core.data import load_tokens
from slimlm.distillation.data import pack_blocks
from slimlm.distillation.lora import add_lora_, merge_lora_
from slimlm.distillation.qat import convert_qat_, prepare_qat_
from slimlm.distillation.students import layer_subset
from slimlm.distillation.teacher_cache import precompute_topk
from slimlm.distillation.trainer import TrainConfig, evaluate_loss, train


def ppl(model, blocks) -> float:
    return math.exp(evaluate_loss(model, blocks))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--data", default="demo")
    p.add_argument("--train-docs", default="0:18")
    p.add_argument("--eval-docs", default="18:")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--heal-steps", type=int, default=150)
    p.add_argument("--heal-lr", type=float, default=3e-4)
    p.add_argument("--only", default="a,b")
    p.add_argument("--cached-k", type=int, default=64, help="top-k of the cached-teacher variant")
    args = p.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    teacher, tok = slimlm.load(args.model, dtype="float32")
    train_blocks = pack_blocks(load_tokens(f"{args.data}@{args.train_docs}", tok), args.seq_len)
    eval_blocks = pack_blocks(load_tokens(f"{args.data}@{args.eval_docs}", tok), args.seq_len)[:64]
    base = ppl(teacher, eval_blocks)
    print(f"model {args.model}: {sum(x.numel() for x in teacher.parameters()) / 1e6:.2f}M parameters, "
          f"{train_blocks.shape[0]} training blocks of {args.seq_len}, {eval_blocks.shape[0]} held-out blocks; "
          f"teacher held-out ppl {base:.3f}, threads {torch.get_num_threads()}")
    common = dict(batch_size=args.batch_size, seq_len=args.seq_len, bf16=False, eval_every=10**6, save_every=10**6)
    if "a" in args.only:
        start = layer_subset(teacher)
        print(f"(a) student: blocks {list(range(0, teacher.config.num_hidden_layers, 2))}, "
              f"{sum(x.numel() for x in start.parameters()) / 1e6:.2f}M parameters, ppl before training {ppl(start, eval_blocks):.3f}")
        t0 = time.perf_counter()
        cached = precompute_topk(teacher, train_blocks, k=args.cached_k)
        cache_s = time.perf_counter() - t0
        for name, alpha, t in (("true tokens only (alpha 1)", 1.0, None), ("distilled (alpha 0, T 2)", 0.0, teacher),
                               ("distilled (alpha 0.5, T 2)", 0.5, teacher),
                               (f"alpha 0.5, cached top-{args.cached_k}", 0.5, cached)):
            if t is cached:
                print(f"    (teacher top-{args.cached_k} cached in {cache_s:.1f} s, {cached.nbytes() / 1e6:.0f} MB)")
            student = copy.deepcopy(start)
            t0 = time.perf_counter()
            train(student, train_blocks, None, TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=args.steps // 10,
                                                           alpha=alpha, temperature=2.0, **common), teacher=t)
            print(f"    {name:<28} held-out ppl {ppl(student, eval_blocks):8.3f}  ({time.perf_counter() - t0:.0f} s, "
                  f"{args.steps} steps)", flush=True)
    if "b" in args.only:
        print(f"(b) recovery: {args.heal_steps} steps, lr {args.heal_lr}, teacher = dense model, alpha 0.5, T 2")
        control = copy.deepcopy(teacher)  # the same fine-tuning on the dense model: what the data alone gives
        train(control, train_blocks, None, TrainConfig(steps=args.heal_steps, lr=args.heal_lr, warmup_steps=10,
                                                       alpha=0.5, temperature=2.0, **common), teacher=teacher)
        print(f"    {'dense + the same fine-tuning':<28} ppl {base:8.3f} -> {ppl(control, eval_blocks):8.3f}")
        cases = [("rtn int4 g32 + QAT", "rtn", dict(bits=4, group_size=32)),
                 ("rtn int3 g32 + QAT", "rtn", dict(bits=3, group_size=32)),
                 ("rtn int4 g32 + LoRA r8", "lora", dict(bits=4, group_size=32)),
                 ("magnitude 50% + masked FT", "magnitude", dict(sparsity=0.5))]
        for name, method, settings in cases:
            model = copy.deepcopy(teacher)
            if method in ("rtn", "lora"):
                slimlm.quantize(model, "rtn", **settings)
            else:
                slimlm.prune(model, method, **settings)
            before = ppl(model, eval_blocks)
            t0 = time.perf_counter()
            if method == "rtn":
                prepare_qat_(model)
            if method == "lora":  # adapters on the frozen int4 model, merged by re-quantizing at the end
                add_lora_(model, rank=8)
            lr = args.heal_lr * (10 if method == "lora" else 1)  # adapters start at zero: a larger step
            train(model, train_blocks, None, TrainConfig(steps=args.heal_steps, lr=lr, warmup_steps=10,
                                                         alpha=0.5, temperature=2.0, **common), teacher=teacher)
            if method == "rtn":
                convert_qat_(model)
            if method == "lora":
                print(f"    {'  (adapters before merging)':<28} ppl {ppl(model, eval_blocks):8.3f}")
                merge_lora_(model)
            after = ppl(model, eval_blocks)
            back = 100 * (before - after) / (before - base) if before > base else float("nan")
            print(f"    {name:<28} ppl {before:8.3f} -> {after:8.3f}  ({back:.0f}% of the loss recovered, "
                  f"{time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
