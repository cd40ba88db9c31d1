"""`slimlm generate MODEL PROMPT`: stream a continuation of the prompt to stdout. The sampling flags
derive from `SamplingParams`, the type the engine and the server use too."""

from __future__ import annotations

import argparse
import sys

from slimlm.commands._common import quiet_libraries
from slimlm.commands._flags import add_config_flags, settings_from_args


def sampling_params():
    from slimlm import SamplingParams

    return SamplingParams


def parallel_config():
    from slimlm import ParallelConfig

    return ParallelConfig


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face model folder, or 'demo'")
    p.add_argument("prompt", help="text to continue")
    add_config_flags(p, [sampling_params()])
    p.add_argument("--draft", default=None,
                   help="speculative decoding: 'ngram' (prompt lookup, no model) or a draft model folder with the same "
                        "tokenizer (e.g. a `slimlm distill` student with fewer blocks)")
    p.add_argument("--num-speculative", type=int, default=4, help="with --draft: tokens proposed per target step")
    add_config_flags(p.add_argument_group("parallelism (starts its own worker processes; torchrun works too)"),
                     [parallel_config()])


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from slimlm.api import generate, load

    settings = settings_from_args(args, sampling_params())
    settings.setdefault("max_new_tokens", sampling_params().max_new_tokens)
    parallel = parallel_config().from_dict(settings_from_args(args, parallel_config()))
    model, tokenizer = load(args.model, tp=parallel.tp, pp=parallel.pp, split_head=parallel.split_head,
                           micro_batches=parallel.micro_batches)
    sys.stdout.write(args.prompt)

    def emit(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    speculative = {}
    if args.draft is not None:
        from slimlm import SpecStats
        from slimlm.core.errors import SlimError

        if parallel.parallel:
            raise SlimError("--draft runs in one process; drop --tp/--pp")
        if args.num_speculative < 1:
            raise SlimError(f"--num-speculative {args.num_speculative} must be at least 1")
        draft = args.draft if args.draft == "ngram" else load(args.draft)[0]
        speculative = dict(draft=draft, num_speculative=args.num_speculative, spec_stats=SpecStats())
    try:
        generate(model, tokenizer, args.prompt, on_text=emit, **settings, **speculative)
    finally:
        if parallel.parallel:
            model.slimlm_parallel.close()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if speculative:
        stats = speculative["spec_stats"]
        print(f"speculative decoding: {100 * stats.acceptance:.0f}% of {stats.proposed} draft tokens accepted, "
              f"{stats.tokens_per_step:.2f} tokens per target step", file=sys.stderr)
    return 0
