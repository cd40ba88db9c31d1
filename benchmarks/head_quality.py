"""What the output head's default treatment costs: perplexity, KL and top-1 agreement against the
original, and the folder size, for int4 g128 (`--bits 4`), int4 g32 and int8 bodies with the head
left in float and with the head in int8 per-channel (`--head int8`; both models here tie the head to
the embeddings, so int8 unties it and stores the embedding separately).

    python benchmarks/head_quality.py [--models demo ../shared/eval-data/hf/stories260K]
                                      [--data ../shared/eval-data/corpora/tinystories_valid_first1000.txt]
"""

from __future__ import annotations

import argparse
import copy

import slimlm
from slimlm.eval.size import weight_bytes

BODIES = {"int4 g128": dict(bits=4, group_size=128), "int4 g32": dict(bits=4, group_size=32),
          "int8": dict(bits=8, group_size=None, symmetric=True)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["demo", "../shared/eval-data/hf/stories260K"])
    p.add_argument("--data", default="../shared/eval-data/corpora/tinystories_valid_first1000.txt")
    p.add_argument("--tokens", type=int, default=16384)
    args = p.parse_args()
    print("| model | body | head | ppl | KL | top-1 | weights MB |")
    print("|---|---|---|---|---|---|---|")
    for path in args.models:
        base, tok = slimlm.load(path)
        orig = slimlm.evaluate(base, tok, args.data, max_tokens=args.tokens)
        print(f"| {path.split('/')[-1]} | original | - | {orig.perplexity:.3f} | 0 | 100% | {weight_bytes(base) / 1e6:.2f} |")
        for body, settings in BODIES.items():
            for head in ("float", "int8"):
                model = slimlm.quantize(copy.deepcopy(base), "rtn", head=head, **settings)
                q = slimlm.evaluate(model, tok, args.data, reference=base, max_tokens=args.tokens)
                print(f"| {path.split('/')[-1]} | {body} | {head} | {q.perplexity:.3f} | {q.kl:.4f} | "
                      f"{q.top1:.2%} | {weight_bytes(model) / 1e6:.2f} |", flush=True)


if __name__ == "__main__":
    main()
