"""Decode speed with the weights in huge pages against ordinary memory and against the memory-mapped
safetensors slimlm loaded before, in one process, alternating.

    python benchmarks/hugepages.py FOLDER [--rounds 12 --tokens 32]

The folder is loaded four times: through the old path (safetensors' memory map), with
SLIMLM_HUGEPAGES=0 (the same plain reads into ordinary memory) and as `slimlm.load` does by default
(memory advised MADV_HUGEPAGE). The engine would move the first two into huge pages (`move_to_hugepages`,
as it does for a model quantized in memory), so theirs are built with SLIMLM_HUGEPAGES=0; a fourth copy,
"moved", is loaded into ordinary memory and handed to the engine with huge pages on, as a model made in
memory is (the Python API). Each round decodes `--tokens` tokens after a 128-token prompt on each
engine in turn (the order flips every round); medians and per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import slimlm
import slimlm.core.model_io as model_io
from slimlm.engine.engine import Engine


def mapped_state(path):
    """The old loading path: every tensor a view into safetensors' memory map of the file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = load_file(path / "model.safetensors")
    with safe_open(path / "model.safetensors", framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for alias, target in aliases.items():
        state.setdefault(alias, state[target])
    return state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models, engines = {}, {}
    reader = model_io.read_safetensors
    for label, flag in (("mmap", "0"), ("ordinary", "0"), ("huge pages", "1"), ("moved", "0")):
        os.environ["SLIMLM_HUGEPAGES"] = flag
        model_io.read_safetensors = mapped_state if label == "mmap" else reader
        models[label] = slimlm.load(args.folder)[0]
        if label == "moved":  # loaded into ordinary memory, as a model made in memory is; the engine moves it
            os.environ["SLIMLM_HUGEPAGES"] = "1"
        engines[label] = Engine(models[label], slots=1, max_len=128 + args.tokens + 8)  # the others: no move
    model_io.read_safetensors = reader
    vocab = next(iter(models.values())).config.vocab_size
    prompt = torch.randint(0, vocab, (128,), generator=torch.Generator().manual_seed(0))

    def tok_s(engine: Engine, n: int) -> float:
        token = engine.prefill(0, prompt).argmax()[None]
        t = time.perf_counter()
        for _ in range(n):
            token = engine.decode(torch.tensor([0]), token).argmax(-1)
        return n / (time.perf_counter() - t)

    for e in engines.values():
        tok_s(e, 4)
    res: dict[str, list[float]] = {k: [] for k in engines}
    for r in range(args.rounds):
        for k in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
            res[k].append(tok_s(engines[k], args.tokens))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in res.items()), flush=True)
    print("median tok/s: " + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in res.items()))
    for a, b in (("mmap", "huge pages"), ("ordinary", "huge pages"), ("ordinary", "moved")):
        ratios = [y / x for x, y in zip(res[a], res[b])]
        print(f"{b} / {a}: median {statistics.median(ratios):.3f} (rounds {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
