"""Mixed precision chosen from per-layer sensitivity against uniform quantization at the same size
(the planner issue's first bar), on stories260K.

    python benchmarks/plan_quality.py

Sensitivity: KL of each (block linear layer, treatment) on 8 x 256 calibration tokens from documents
0-199 (`--method fisher`, the planner's default, or `direct`). The allocation (`planner.allocate.pareto_front`) gives the whole size / predicted-KL front;
points at the size of uniform int4 g32 and uniform int3 g32 (and 8 more spread over the front) are
built as the weights the treatments store and measured on held-out tokens from documents 500 on
(KL and top-1 against fp32, perplexity). Uniform baselines: RTN int4 g32 / int3 g32 and GPTQ int4 g32
(slimlm's GPTQ, same calibration documents). GPTQ int8 / int4 g128 / int4 g32 / int3 g32 runs are
treatments too (`sensitivity.from_model`): a layer may take its GPTQ codes. Sizes count the block linear layers only (embedding, head
and norms are the same in every variant).
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

import torch

import slimlm
from slimlm.core.data import load_tokens
from slimlm.planner.allocate import lagrangian_bound, pareto_front
from slimlm.planner.sensitivity import block_linears, from_model, measure_sensitivity, treatments

SHARED = Path(__file__).resolve().parents[2] / "shared/eval-data"


def evaluate(model, base_logp, windows) -> tuple[float, float, float]:
    """(KL, top-1 agreement, perplexity) on held-out windows."""
    kl = top = nll = 0.0
    count = 0
    with torch.no_grad():
        for ref, row in zip(base_logp, windows):
            logits = model(row[None]).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            kl += float((ref.exp() * (ref - logp)).sum(-1).clamp(min=0).sum())
            top += float((ref.argmax(-1) == logp.argmax(-1)).sum())
            nll += float(torch.nn.functional.cross_entropy(logits[:-1], row[1:], reduction="sum"))
            count += row.numel()
    return kl / count, top / count, math.exp(nll / (count - len(windows)))


def apply_choice(model, layers, table, picked):
    """A copy of `model` whose block layers hold the weights of the treatments `picked` (a name per layer)."""
    out = copy.deepcopy(model)
    modules = block_linears(out)
    with torch.no_grad():
        for layer, name in zip(layers, picked):
            modules[layer].weight.data = table[name].apply(layer, modules[layer].weight.data)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(SHARED / "hf/stories260K"))
    p.add_argument("--data", default=str(SHARED / "corpora/tinystories_valid_first1000.txt"))
    p.add_argument("--calib-windows", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=50_000)
    p.add_argument("--method", default="fisher", choices=["fisher", "direct"], help="sensitivity measurement")
    args = p.parse_args()
    base, tok = slimlm.load(args.model)
    calib = load_tokens(f"{args.data}@0:200", tok)
    held = load_tokens(f"{args.data}@500:", tok, max_tokens=args.eval_tokens)
    window = base.config.max_position_embeddings
    windows = held[: held.numel() // window * window].view(-1, window)
    sens_tokens = calib[: args.calib_windows * 256].view(args.calib_windows, 256)
    with torch.no_grad():
        base_logp = [torch.log_softmax(base(row[None]).logits[0].float(), -1) for row in windows]
    names = ["int8", "int4 g128", "int4 g32", "int3 g32", "int2 g32", "2:4", "50%"]
    extra = {}
    for bits, group in ((8, None), (4, 128), (4, 32), (3, 32)):
        label = f"gptq int{bits}" + (f" g{group}" if group else "")
        copy, _ = slimlm.load(args.model)
        slimlm.quantize(copy, "gptq", tokenizer=tok, calibration=calib, bits=bits, group_size=group, n_samples=128,
                        seq_len=256, **({"symmetric": True} if bits == 8 else {}))
        extra[label] = from_model(copy)
    names_all = names + list(extra)
    sens = measure_sensitivity(base, sens_tokens, names=names, extra=extra, method=args.method)
    table = {**treatments(), **extra}
    options = sens.options()
    index = {n: j for j, n in enumerate(names_all)}
    front = pareto_front(options)
    print(f"{len(sens.layers)} layers x {len(names_all)} treatments; front of {len(front.points)} points (exact: {front.exact})")

    def uniform_bytes(name):
        return sum(sens.bytes[i][index[name]] for i in range(len(sens.layers)))

    def choice_names(point):
        picked = [options[i][j].name for i, j in enumerate(point.choice)]
        return {n: picked.count(n) for n in names_all if picked.count(n)}

    rows = []
    for label, name in [("uniform rtn int4 g32", "int4 g32"), ("uniform rtn int3 g32", "int3 g32")]:
        model = apply_choice(base, sens.layers, table, [name] * len(sens.layers))
        rows.append((label, uniform_bytes(name), sum(sens.kl[i][index[name]] for i in range(len(sens.layers))),
                     *evaluate(model, base_logp, windows), ""))
    gptq, _ = slimlm.load(args.model)
    slimlm.quantize(gptq, "gptq", tokenizer=tok, calibration=calib, bits=4, group_size=32, n_samples=128, seq_len=256)
    rows.append(("uniform gptq int4 g32 (copy)", uniform_bytes("gptq int4 g32"), float("nan"),
                 *evaluate(apply_choice(base, sens.layers, table, ["gptq int4 g32"] * len(sens.layers)), base_logp, windows), ""))
    rows.append(("uniform gptq int4 g32", uniform_bytes("gptq int4 g32"),
                 sum(sens.kl[i][index["gptq int4 g32"]] for i in range(len(sens.layers))), *evaluate(gptq, base_logp, windows), ""))
    measured = []
    budgets = [("planned @ int4 g32 size", uniform_bytes("int4 g32")), ("planned @ int3 g32 size", uniform_bytes("int3 g32"))]
    spread = [front.points[round(k * (len(front.points) - 1) / 9)] for k in range(10)]
    for label, budget in budgets + [(f"front point {k}", p.bytes) for k, p in enumerate(spread)]:
        point = front.best(budget)
        model = apply_choice(base, sens.layers, table, [options[i][j].name for i, j in enumerate(point.choice)])
        result = evaluate(model, base_logp, windows)
        measured.append((point.loss, result[0]))
        bound = lagrangian_bound(options, budget)
        rows.append((label, point.bytes, point.loss, *result, f"{choice_names(point)} (bound {bound:.4f})"))
    print(f"\n{'variant':<26} {'KB':>7} {'pred KL':>8} {'KL':>8} {'top-1':>7} {'ppl':>7}  treatments")
    for label, b, pred, kl, top, ppl, note in rows:
        print(f"{label:<26} {b / 1e3:>7.1f} {pred:>8.4f} {kl:>8.4f} {100 * top:>6.1f}% {ppl:>7.3f}  {note}")
    pred = torch.tensor([m[0] for m in measured])
    real = torch.tensor([m[1] for m in measured])
    rank = lambda t: t.argsort().argsort().float()  # noqa: E731
    rho = float(torch.corrcoef(torch.stack([rank(pred), rank(real)]))[0, 1])
    print(f"\nSpearman rank correlation of predicted and measured KL over the {len(measured)} planned points: {rho:.3f}")


if __name__ == "__main__":
    main()
