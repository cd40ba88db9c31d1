"""The recipe search (`slimlm plan --search`) on stories260K against the allocation alone.

For each size budget (uniform int4 g32's and uniform int3 g32's bytes of block linear weights), run
successive halving over the default space (no structure, blocks 20%, channels 25%, heads 25%; each
structure with and without 100 steps of distillation; rtn / gptq / awq / awq+gptq), calibrating on
documents 0-199 and checking the finalists on 8192 tokens of documents 200-499. Then measure on
held-out text from document 500 (never seen by the search): the search's winner, the allocation alone (`slimlm plan` without --search:
AWQ's scales folded, then RTN and GPTQ codes per layer, all windows; and without the scales), and
uniform RTN / GPTQ int4 g32 (or int3 g32).

    python benchmarks/plan_search.py [--budgets int4,int3] [--eval-tokens 49664]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import slimlm
from slimlm.core.data import load_tokens
from slimlm.eval.perplexity import evaluate_quality
from slimlm.planner.check import check_plan
from slimlm.planner.plan import AWQ_SCALES, Budgets, PlanConfig, plan
from slimlm.planner.search import candidates, search
from slimlm.planner.sensitivity import block_linears, treatments

SHARED = Path(__file__).resolve().parents[2] / "shared/eval-data"


def uniform_bytes(model, bits: int) -> int:
    """What uniform RTN int{bits} g32 stores for the block linear layers (the planner's own count)."""
    stored = treatments()[f"int{bits} g32"].stored
    return sum(stored(name, *m.weight.shape, m.weight.element_size()) for name, m in block_linears(model).items())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(SHARED / "hf/stories260K"))
    p.add_argument("--data", default=str(SHARED / "corpora/tinystories_valid_first1000.txt"))
    p.add_argument("--budgets", default="int4,int3")
    p.add_argument("--eval-tokens", type=int, default=49_664)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--state", default="", help="folder for the searches' state files (resume)")
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = slimlm.load(args.model)
    calib = f"{args.data}@0:200"
    config = PlanConfig(max_size="1KB", calib=calib, windows=args.windows, seq_len=256)
    ids, tokens = config.windows_of(tok)
    held = load_tokens(f"{args.data}@500:", tok, max_tokens=args.eval_tokens)
    validation = load_tokens(f"{args.data}@200:500", tok, max_tokens=8192)  # the search's finalists are checked on it

    def load():
        return slimlm.load(args.model)[0]

    calibration = dict(calib=calib, n_samples=128, seq_len=256)
    space = candidates(config.structures, config.recover_steps, config.methods)
    rows = []
    for name in args.budgets.split(","):
        bits = int(name.removeprefix("int"))
        budget = uniform_bytes(model, bits)
        budgets = Budgets(max_bytes=budget)
        t0 = time.perf_counter()
        state = str(Path(args.state) / f"search-{name}.json") if args.state else None
        result = search(load, tok, ids, tokens, validation, budgets, space, calibration, state=state,
                        on_step=lambda task, done, total: print(f"  [{done}/{total}] {task}", flush=True))
        searched_s = time.perf_counter() - t0
        print(f"\n{name} g32 size ({budget / 1e3:.1f} KB): search over {len(space)} candidates took {searched_s:.0f} s; "
              f"winner {result.winner}")
        for row in result.rows():
            print("  " + " | ".join(f"{v:<34}" if k == "candidate" else f"{v:<12}" for k, v in row.items()))
        t0 = time.perf_counter()
        default = plan(load, tokens, calibration=ids, gptq=True, gptq_settings=calibration, budgets=budgets,
                       prefix=[dict(AWQ_SCALES, **calibration)], tokenizer=tok)
        default_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        alone = plan(load, tokens, calibration=ids, gptq=True, gptq_settings=calibration, budgets=budgets)
        alone_s = time.perf_counter() - t0
        uniform = [dict(method="rtn", bits=bits, group_size=32, symmetric=False)]
        gptq = [dict(method="gptq", bits=bits, group_size=32, symmetric=False, **calibration)]
        for label, recipe in [(f"search winner ({result.winner})", result.plan.recipe),
                              (f"slimlm plan's default ({default_s:.0f} s)", default.recipe),
                              (f"allocation without AWQ's scales ({alone_s:.0f} s)", alone.recipe),
                              (f"uniform rtn {name} g32", uniform), (f"uniform gptq {name} g32", gptq)]:
            m = check_plan(load, recipe, budgets, held, tokenizer=tok, speed=False)
            rows.append((f"@{name} size: {label}", m["bytes"], m["kl"], m["top1"], m["perplexity"]))
    ref = evaluate_quality(model, held)
    print(f"\nheld-out: {held.numel()} tokens from document 500; original perplexity {ref.perplexity:.3f}")
    print(f"{'variant':<64} {'KB':>7} {'KL':>8} {'top-1':>7} {'ppl':>7}")
    for label, b, kl, top, ppl in rows:
        print(f"{label:<64} {b / 1e3:>7.1f} {kl:>8.4f} {100 * top:>6.1f}% {ppl:>7.3f}")


if __name__ == "__main__":
    main()
