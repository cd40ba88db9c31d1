"""`slimlm eval MODEL`: perplexity on a text file, and KL / top-1 agreement against a reference model."""

from __future__ import annotations

import argparse

from slimlm.commands._common import print_json, print_table, progress_bar, quiet_libraries


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face model folder, or 'demo'")
    p.add_argument("--data", default="demo", help=".txt, .jsonl, or 'demo' (the built-in held-out corpus)")
    p.add_argument("--reference", default=None, help="original model folder: adds KL divergence and top-1 agreement")
    p.add_argument("--window", type=int, default=None, help="window length in tokens (default min(context, 512))")
    p.add_argument("--stride", type=int, default=None, help="window stride (default: the window length)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate on at most this many tokens")
    p.add_argument("--tasks", default=None,
                   help="task accuracy instead, through the lm-evaluation-harness (pip install 'slimlm[eval]'): "
                        "comma-separated lm-eval task names")
    p.add_argument("--include-path", default=None, help="with --tasks: a folder of task YAML files (local tasks)")
    p.add_argument("--limit", type=int, default=None, help="with --tasks: at most this many samples per task")
    p.add_argument("--num-fewshot", type=int, default=None, help="with --tasks: few-shot examples per prompt")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from slimlm.api import evaluate, load

    model, tokenizer = load(args.model)
    if args.tasks:
        return _tasks(args, model, tokenizer)
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


def _tasks(args: argparse.Namespace, model, tokenizer) -> int:
    from slimlm.api import eval_tasks

    results = eval_tasks(model, tokenizer, [t.strip() for t in args.tasks.split(",") if t.strip()],
                         include_path=args.include_path, limit=args.limit, num_fewshot=args.num_fewshot)
    results.pop("samples", None)
    if args.json:
        print_json(results)
        return 0
    print_table([{"task": task, "metric": metric, "value": f"{value:.4f}" if isinstance(value, float) else str(value)}
                 for task, values in results.items() for metric, value in values.items()],
                title=f"{args.model}: lm-eval tasks")
    return 0
