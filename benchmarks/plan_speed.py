"""The planner's speed floor, built and measured (the planner issue's speed bar): for each
--min-decode X, `slimlm plan`'s allocation is asked for the best predicted quality whose batch-1
decode on slimlm's engine is at least X tok/s on this machine, the plan is built, and its decode
speed is measured; predicted against measured, and whether X was met.

    python benchmarks/plan_speed.py --model demo --floors 1000,1300
    python benchmarks/plan_speed.py --tinyllama --floors 15,25,30
    python benchmarks/plan_speed.py --tinyllama --floors '' --ttft 3000,2000 --throughput 60 --streams 8

--tinyllama: a TinyLlama-1.1B-shaped model with random weights (bf16; hidden 2048, 22 layers), saved
to a temporary folder; its sensitivity is measured on 2 windows of 64 tokens (random weights: the
quality figures mean nothing there, the speed ones do). The speed model is calibrated once and
shared by the floors; each floor's plan is built and measured (the planner re-plans a build that
misses, at most 3 builds). KL / perplexity are not measured for the 1.1B shape.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import slimlm
from slimlm.core.data import load_tokens
from slimlm.planner.check import check_plan
from slimlm.planner.plan import Budgets, plan
from slimlm.planner.sensitivity import block_linears
from slimlm.planner.speed import calibrate, storage_format


def tinyllama_folder(root: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.normal_(0, 0.02) if p.dim() > 1 else p.data.fill_(1.0)
    model.model.rotary_emb.__init__(config)
    model = model.to(torch.bfloat16)
    folder = root / "tinyllama"
    model.save_pretrained(folder)
    _, tok = slimlm.load("demo")
    tok.save_pretrained(folder)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--tinyllama", action="store_true")
    p.add_argument("--floors", default="1000,1300", help="tok/s floors, comma separated ('' for none)")
    p.add_argument("--ttft", default="", help="time-to-first-token budgets in ms (--max-ttft), comma separated")
    p.add_argument("--throughput", default="", help="throughput floors in tok/s at --streams (--min-throughput)")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=128)
    args = p.parse_args()
    cases = [Budgets(min_decode=float(x)) for x in args.floors.split(",") if x]
    cases += [Budgets(max_ttft=float(x) / 1e3, prompt_tokens=args.prompt_tokens) for x in args.ttft.split(",") if x]
    cases += [Budgets(min_throughput=float(x), streams=args.streams) for x in args.throughput.split(",") if x]
    figures: dict[str, int] = {}
    for b in cases:
        figures.update(b.figures())
    with tempfile.TemporaryDirectory() as tmp:
        path = str(tinyllama_folder(Path(tmp))) if args.tinyllama else args.model
        _, tok = slimlm.load(path)
        ids = load_tokens("demo", tok)
        windows, seq = (2, 64) if args.tinyllama else (4, 256)
        tokens = ids[: windows * seq].view(windows, seq)
        held = None if args.tinyllama else load_tokens(str(Path(slimlm.__file__).parent / "assets/demo/heldout.txt"), tok,
                                                       max_tokens=8192)

        def load():
            return slimlm.load(path)[0]

        t0 = time.time()
        base = load()
        shapes = {n: tuple(m.weight.shape) for n, m in block_linears(base).items()}
        del base
        from slimlm.planner.plan import RTN, STEPS

        formats = [storage_format(None)] + [storage_format(STEPS[t]) for t in RTN]
        speed = calibrate(load, shapes, formats, figures)
        print(f"speed model calibrated in {time.time() - t0:.0f} s; uniform models, measured and as the model "
              f"predicts them (seconds per step: decode 1 token, prefill {args.prompt_tokens}, streams {args.streams}):")
        for label, measured in speed.reference.items():
            print(f"  {label:<12} " + "  ".join(f"{fig} measured {measured[fig]:.4g} model {speed.fitted[label][fig]:.4g}"
                                                for fig in measured))
        rows = []
        for budgets in cases:
            (fig, limit), = budgets.step_limits().items()
            floor = {"decode": lambda s: f"decode >= {1 / s:g} tok/s", "prefill": lambda s: f"TTFT <= {s * 1e3:g} ms",
                     "streams": lambda s: f"throughput >= {budgets.streams / s:g} tok/s at {budgets.streams} streams"}[fig](limit)
            t0 = time.time()
            try:
                result = plan(load, tokens, gptq=False, budgets=budgets, state=str(Path(tmp) / "sens.json"),
                              fisher_samples=1 if args.tinyllama else 4, speed=speed,
                              verify=lambda recipe: check_plan(load, recipe, budgets, held))
            except slimlm.SlimError as e:
                rows.append((floor, "infeasible", str(e)))
                print(f"{floor}: infeasible: {e}", flush=True)
                continue
            last = result.checks[-1]
            counts: dict[str, int] = {}
            for t in result.treatments().values():
                counts[t] = counts.get(t, 0) + 1
            rows.append((floor, f"predicted {result.predicted()[fig]:.4g} s, measured {last[fig]:.4g} s per step "
                                f"({'met' if last[fig] <= limit * 1.0001 else 'MISSED'}; {len(result.checks)} build(s)); "
                                f"{last['bytes'] / 1e6:.1f} MB, predicted KL {result.point.loss:.4f}"
                                + (f", measured KL {last['kl']:.4f}, ppl {last['perplexity']:.2f}" if "kl" in last else ""),
                         str(counts)))
            print(f"{floor}: {rows[-1][1]}  {rows[-1][2]}  ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
