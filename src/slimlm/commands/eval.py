"""`slimlm eval MODEL`: perplexity on a text file, and KL / top-1 agreement against a reference model."""

from __future__ import annotations

import argparse

from slimlm.commands._common import print_json, progress_bar, quiet_libraries


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face model folder, or 'demo'")
    p.add_argument("--data", default="demo", help=".txt, .jsonl, or 'demo' (the built-in held-out corpus)")
    p.add_argument("--reference", default=None, help="original model folder: adds KL divergence and top-1 agreement")
    p.add_argument("--window", type=int, default=None, help="window length in tokens (default min(context, 512))")
    p.add_argument("--stride", type=int, default=None, help="window stride (default: the window length)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate on at most this many tokens")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from slimlm.api import evaluate, load

    model, tokenizer = load(args.model)
    reference = load(args.reference)[0] if args.reference else None
    with progress_bar(not args.json) as update:
        result = evaluate(model, tokenizer, args.data, reference, args.window, args.stride, args.max_tokens,
                          on_progress=lambda d, t: update("evaluate", d, t))
    if args.json:
        print_json(result.to_dict())
        return 0
    line = f"perplexity {result.perplexity:.4f} over {result.tokens} tokens"
    if result.kl is not None:
        line += f"; KL {result.kl:.5f} nats/token, top-1 agreement {100 * result.top1:.2f}%"
    print(line)
    return 0
