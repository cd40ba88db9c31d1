"""`slimlm <verb>`: one module per verb in slimlm.commands, imported only when that verb runs (its
flags are derived from the library's configs, which imports torch: `slimlm --help` stays instant)."""

from __future__ import annotations

import argparse
import importlib
import sys

VERBS = {
    "compress": "take a model through fp32/bf16/int8/int4 variants and print the before/after report",
    "quantize": "quantize a model and save it",
    "prune": "prune a model (magnitude, random, taylor, wanda, sparsegpt; n:m; heads, channels, blocks) and save it",
    "distill": "train a smaller student to match a teacher (soft targets at a temperature) and save it",
    "finetune": "recover what compression cost: fine-tune keeping pruned zeros, QAT (--qat) or LoRA (--lora)",
    "serve": "OpenAI-compatible server with continuous batching, streaming and Prometheus metrics",
    "eval": "perplexity, and KL / top-1 agreement against a reference model",
    "bench": "prefill/decode speed, time to first token, achieved bandwidth, peak memory",
    "generate": "continue a prompt",
    "export": "write GGUF for llama.cpp/Ollama (quantized codes copied exactly) or a dense Hugging Face folder",
    "inspect": "architecture, parameters, per-layer schemes and size",
    "sensitivity": "per-layer sensitivity: the KL each block linear layer costs under each treatment, and its bytes",
    "plan": "choose per-layer compression for a target (edge/realtime/cloud) or budgets (size, KL, speed), built and measured",
    "plan-parallel": "predict latency, throughput and memory of tensor/pipeline/replica layouts on a cluster",
}


def build_parser(verbs: tuple[str, ...] = tuple(VERBS)) -> argparse.ArgumentParser:
    """The parser, with the flags of `verbs` (the others are listed by name only)."""
    from slimlm import __version__

    parser = argparse.ArgumentParser(prog="slimlm", description="Make language models smaller and faster, and prove it.")
    parser.add_argument("--version", action="version", version=f"slimlm {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, help_text in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        if verb in verbs:
            module = importlib.import_module(f"slimlm.commands.{verb.replace('-', '_')}")
            module.add_args(p)
            p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: PyTorch's choice)")
            p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser((chosen,) if chosen in VERBS else ())
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    from slimlm.core.errors import SlimError

    try:
        if args.threads is not None:
            import torch

            if args.threads < 1:
                raise SlimError(f"--threads {args.threads} must be at least 1")
            torch.set_num_threads(args.threads)
        return int(args.run(args) or 0)
    except SlimError as e:
        print(f"slimlm {args.verb}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"slimlm {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
