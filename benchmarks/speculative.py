"""Speculative decoding: acceptance and speed-up, greedy, against plain decoding in the same rounds.

    python benchmarks/speculative.py --model ../shared/eval-data/hf/stories260K --draft DRAFT_FOLDER \\
        --data ../shared/eval-data/corpora/tinystories_valid_first1000.txt@800: [--k 2,4 --new-tokens 128]
    python benchmarks/speculative.py --model FOLDER --scripted 0,0.5,0.8,1 [--k 4 --batch 1,8]

The first form runs prompt lookup ('ngram') and the draft model on prompts taken from held-out text
(the first 32 tokens of each document) and reports the acceptance rate, tokens per target step and
tokens/s against plain decoding. The second bounds the speed-up on a model by the acceptance rate
alone: a scripted draft knows the continuation (the one verification itself picks, from a run whose
draft never agrees) and proposes each token right with probability a (a wrong token otherwise), at
no cost, so a = 1 is an oracle that always agrees and a = 0 one that never does. Each configuration
alternates with plain decoding, rounds of `--batch` prompts decoded together (speculative: one
forward verifies every row's proposal; plain: batched decode steps); tokens/s counts all rows.
"same as plain" is the share of the output before the first token that differs from plain greedy
decoding: 100% in float32; in bfloat16 the verification forward (the prefill op set over k + 1
positions) rounds differently from the fused decode step, so a near-tie can flip.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

import slimlm
from slimlm.engine import speculative as spec
from slimlm.engine.generate import generate_ids
from slimlm.engine.sampling import SamplingParams


class ScriptedDraft:
    """Proposes each row's reference continuation, each token right with probability `rate`."""

    def __init__(self, prompt_len: int, references: list[list[int]], rate: float, vocab: int, seed: int = 0) -> None:
        self.prompt_len, self.references, self.rate, self.vocab = prompt_len, references, rate, vocab
        self.rng = random.Random(seed)

    def propose(self, sequence, k, params, generator=None, slot=0):
        at = len(sequence) - self.prompt_len
        out = []
        for token in self.references[slot][at:at + k]:
            out.append(token if self.rng.random() < self.rate else (token + 1) % self.vocab)
        return out, None

    def rollback(self, length, slot=0):
        pass


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--draft", default=None, help="draft model folder (with --data)")
    p.add_argument("--data", default=None, help="held-out text for the prompts")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--scripted", default=None, help="acceptance rates of a scripted draft, e.g. 0,0.5,1")
    p.add_argument("--k", default="4")
    p.add_argument("--batch", default="1", help="prompts decoded together, e.g. 1,8")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default=None, help="float32 makes verification round like the decode step")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = slimlm.load(args.model, dtype=args.dtype)
    params = SamplingParams(max_new_tokens=args.new_tokens)
    ks = [int(k) for k in args.k.split(",")]
    if args.data:
        from slimlm.core.data import read_documents

        texts = [t for t in read_documents(args.data) if len(tok(t)["input_ids"]) > 40][:args.prompts]
        prompts = [torch.tensor([tok(t)["input_ids"][:32]]) for t in texts]
    else:
        prompts = [torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(i))
                   for i in range(args.prompts)]
    generate_ids(model, prompts[0], SamplingParams(max_new_tokens=4), engine=True)  # warm-up
    configs = []
    if args.scripted is not None:
        configs += [(f"scripted a={a}", float(a), k) for a in args.scripted.split(",") for k in ks]
    else:
        configs += [("ngram", "ngram", k) for k in ks]
        if args.draft:
            draft_model = slimlm.load(args.draft)[0]
            configs += [(f"draft {args.draft.rstrip('/').split('/')[-1]}", draft_model, k) for k in ks]
    print(f"{args.model}: {len(prompts)} prompts of 32 tokens, {args.new_tokens} new tokens, greedy, "
          f"{args.threads} threads")
    print(f"{'draft':<28} {'k':>2} {'batch':>5} {'accepted':>9} {'tok/step':>9} {'spec tok/s':>11} {'plain tok/s':>12} "
          f"{'speed-up':>9} {'same as plain':>14}")
    for batch in [int(b) for b in args.batch.split(",")]:
        groups = [torch.cat(prompts[i:i + batch]) for i in range(0, len(prompts) - batch + 1, batch)]
        if not groups:
            raise SystemExit(f"--batch {batch} needs at least {batch} prompts (--prompts)")
        for label, draft, k in configs:
            accepted = proposed = emitted = steps = 0
            spec_s, plain_s, same = [], [], []
            for i, group in enumerate(groups):
                (want, t_plain) = timed(lambda: generate_ids(model, group, params, engine=True))
                d = draft
                if isinstance(draft, float):  # the reference: what verification itself picks (a draft never agreeing)
                    never = ScriptedDraft(group.shape[1], want.tolist(), 0.0, model.config.vocab_size)
                    reference = spec.generate(model, group, params, never, k=k)[0].tolist()
                    d = ScriptedDraft(group.shape[1], reference, draft, model.config.vocab_size, seed=i)
                (got, stats), t_spec = timed(lambda: spec.generate(model, group, params, d, k=k))
                for row in range(group.shape[0]):
                    n = min(got.shape[1], want.shape[1])
                    first = next((j for j in range(n) if got[row, j] != want[row, j]), n)
                    same.append(first / want.shape[1])  # share of the output before the first difference
                accepted, proposed = accepted + stats.accepted, proposed + stats.proposed
                emitted, steps = emitted + stats.emitted, steps + stats.target_steps
                spec_s.append(stats.emitted / t_spec)
                plain_s.append(want.numel() / t_plain)
            ratio = statistics.median(a / b for a, b in zip(spec_s, plain_s))
            print(f"{label:<28} {k:>2} {batch:>5} {100 * accepted / max(proposed, 1):>8.0f}% "
                  f"{emitted / max(steps, 1) / batch:>9.2f} {statistics.median(spec_s):>11.1f} "
                  f"{statistics.median(plain_s):>12.1f} {ratio:>8.2f}x {100 * statistics.mean(same):>13.0f}%", flush=True)


if __name__ == "__main__":
    main()
