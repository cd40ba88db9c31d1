"""`slimlm generate MODEL PROMPT`: stream a continuation of the prompt to stdout."""

from __future__ import annotations

import argparse
import sys

from slimlm.commands._common import quiet_libraries


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face model folder, or 'demo'")
    p.add_argument("prompt", help="text to continue")
    p.add_argument("-n", "--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from slimlm.api import generate, load

    model, tokenizer = load(args.model)
    sys.stdout.write(args.prompt)

    def emit(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, emit)
    sys.stdout.write("\n")
    return 0
