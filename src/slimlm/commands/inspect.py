"""`slimlm inspect MODEL`: architecture, parameter count, per-layer schemes and size."""

from __future__ import annotations

import argparse
from collections import Counter

from slimlm.commands._common import print_json, print_table, quiet_libraries


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face model folder, or 'demo'")
    p.add_argument("--layers", action="store_true", help="list every linear layer")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from slimlm.api import load
    from slimlm.core.layers import context_length
    from slimlm.eval.size import describe_layers, measure_size

    model, tokenizer = load(args.model)
    size = measure_size(model)
    layers = describe_layers(model)
    info = {
        "model": args.model,
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "layers": getattr(model.config, "num_hidden_layers", None),
        "hidden_size": getattr(model.config, "hidden_size", None),
        "vocab_size": model.config.vocab_size,
        "context": context_length(model),
        "parameters": size.parameters,
        "weight_bytes": size.weight_bytes,
        "bits_per_weight": round(size.bits_per_weight, 3),
        "linear_bits_per_weight": round(size.linear_bits_per_weight, 3),
        "schemes": dict(Counter(layer["scheme"] for layer in layers)),
    }
    if args.json:
        print_json({**info, "linear_layers": layers})
        return 0
    print_table([{"field": k, "value": str(v)} for k, v in info.items()], title=f"slimlm inspect: {args.model}")
    if args.layers:
        print_table([{"layer": l["name"], "shape": "x".join(map(str, l["shape"])), "scheme": l["scheme"],
                      "KB": f"{l['bytes'] / 1e3:.1f}"} for l in layers])
    return 0
