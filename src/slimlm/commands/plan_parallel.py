"""`slimlm plan-parallel MODEL`: the predicted latency, throughput and memory per device of every
tensor / pipeline / replica layout of a model on a cluster (the cost model of `parallel/cost.py`),
and the layout it recommends. MODEL is a model folder or a known shape (tinyllama-1.1b, llama-3-8b,
llama-3-70b)."""

from __future__ import annotations

import argparse

from slimlm.commands._common import print_json, print_table
from slimlm.commands._flags import add_config_flags, settings_from_args


def plan_config():
    from slimlm.parallel.cost import PlanParallelConfig

    return PlanParallelConfig


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model folder, or tinyllama-1.1b, llama-3-8b, llama-3-70b")
    add_config_flags(p, [plan_config()])
    p.add_argument("--json", action="store_true")


def shape_of(model: str):
    from slimlm.core.errors import SlimError
    from slimlm.parallel.cost import SHAPES, ModelShape

    if model in SHAPES:
        return SHAPES[model]
    from slimlm.core.model_io import causal_lm_config, read_config_json, resolve_model_path

    path = resolve_model_path(model)
    config = causal_lm_config(path, read_config_json(path))
    if not hasattr(config, "intermediate_size"):
        raise SlimError(f"the cost model knows Llama-family shapes; {config.model_type} has no intermediate_size")
    return ModelShape.from_config(config)


def run(args: argparse.Namespace) -> int:
    from slimlm.parallel.cost import plan

    config = plan_config().from_dict(settings_from_args(args, plan_config()))
    predictions = plan(shape_of(args.model), config)
    rows = [{"layout": p.layout.label(), "ms/token (b1)": f"{p.latency_ms:.2f}",
             f"tok/s (b{config.batch})": f"{p.throughput:.0f}", "GB/device": f"{p.memory_gb:.1f}",
             "fits": "yes" if p.fits else "no", "comm share (b1)": f"{100 * p.comm_share:.0f}%"} for p in predictions]
    fitting = [p for p in predictions if p.fits]
    if args.json:
        print_json({"config": config.to_dict(), "layouts": rows,
                    "throughput": fitting[0].layout.label() if fitting else None,
                    "latency": min(fitting, key=lambda p: p.latency_ms).layout.label() if fitting else None})
        return 0
    where = f"{config.nodes} x {config.gpus_per_node} {config.device} ({config.link}" + \
        (f", {config.inter_node} between nodes)" if config.nodes > 1 else ")")
    print_table(rows, title=f"{args.model} at {config.bits:g} bits/weight on {where}, context {config.context}")
    if fitting:
        fast = min(fitting, key=lambda p: p.latency_ms)
        print(f"for throughput: {fitting[0].layout.label()} ({fitting[0].throughput:.0f} tok/s at batch {config.batch}); "
              f"for latency: {fast.layout.label()} ({fast.latency_ms:.2f} ms/token)")
    else:
        print("no layout fits the devices' memory; use more devices or fewer bits per weight")
    return 0
