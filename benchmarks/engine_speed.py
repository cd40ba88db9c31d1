"""Decode and prefill speed of slimlm's engine against transformers' own forward, on a
TinyLlama-1.1B-shaped random model built locally (hidden 2048, intermediate 5632, 22 layers,
32/4 heads, vocab 32000), for fp32, bf16, int8 and int4 g32/g128 weights (default kernels) and the
opt-in int8-activation kernels ("a8").

    python benchmarks/engine_speed.py [--threads 2 --new-tokens 64 --repeats 3 --batch-sizes 1,4,8,16]

For each variant the engine and the baseline are timed alternately in the same process (so load
from other processes hits both alike); medians with min-max. `--layers 4` gives a quick run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import slimlm
from slimlm.eval.speed import _Runner, _sync, decode_bytes_per_step, measure_bandwidth

VARIANTS = {
    "fp32": [],
    "bf16": [("cast", {"dtype": "bfloat16"})],
    "int8": [("cast", {"dtype": "bfloat16"}), ("rtn", {"bits": 8, "group_size": None, "symmetric": True})],
    "int4 g32": [("cast", {"dtype": "bfloat16"}), ("rtn", {"bits": 4, "group_size": 32})],
    "int4 g128": [("cast", {"dtype": "bfloat16"}), ("rtn", {"bits": 4, "group_size": 128})],
    "int8 +head": [("cast", {"dtype": "bfloat16"}),
                   ("rtn", {"bits": 8, "group_size": None, "symmetric": True, "include": ["*", "lm_head"]})],
    "int4 g128 +head": [("cast", {"dtype": "bfloat16"}), ("rtn", {"bits": 4, "group_size": 128, "include": ["*", "lm_head"]})],
    "int4 g32 +head": [("cast", {"dtype": "bfloat16"}), ("rtn", {"bits": 4, "group_size": 32, "include": ["*", "lm_head"]})],
    "int4 g32 a8": [("cast", {"dtype": "bfloat16"}), ("rtn", {"bits": 4, "group_size": 32}), ("kernel", "cpu_int4_a8")],
    "int8 a8": [("cast", {"dtype": "bfloat16"}), ("rtn", {"bits": 8, "group_size": None, "symmetric": True}),
                ("kernel", "cpu_int8_a8")],
}


def apply_variant(model: nn.Module, name: str) -> None:
    """The variant's casts and quantization; a named kernel is forced on the layers it can run (an
    int4 kernel leaves the int8 head to its own)."""
    from slimlm.quant.kernels import KERNELS

    for method, settings in VARIANTS[name]:
        if method != "kernel":
            slimlm.quantize(model, method, **settings)
            continue
        for module in model.modules():
            if hasattr(module, "set_kernel_") and hasattr(module, "scheme") and \
                    KERNELS.get(settings).supports(module, torch.device("cpu")):
                module.set_kernel_(settings)


@torch.no_grad()
def decode_seconds(runner: _Runner, ids: torch.Tensor, steps: int) -> float:
    tokens = runner.prefill(ids).argmax(-1)
    _sync(ids.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        tokens = runner.step(tokens).argmax(-1)
    _sync(ids.device)
    return time.perf_counter() - t0


@torch.no_grad()
def prefill_seconds(runner: _Runner, ids: torch.Tensor) -> float:
    _sync(ids.device)
    t0 = time.perf_counter()
    runner.prefill(ids).argmax(-1)
    _sync(ids.device)
    return time.perf_counter() - t0


def build(layers: int, device: str = "cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device=device)
    for name, p in model.named_parameters():  # random weights at a realistic scale, fast
        p.data.normal_(0, 0.02) if p.dim() > 1 else p.data.fill_(1.0)
    model.model.rotary_emb.__init__(config)  # its buffers were on meta
    model.model.rotary_emb.to(device)
    return model.eval()


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):8.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-sizes", default="1")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--device", default="cpu", help="cpu or cuda (the a8 variants are CPU-only)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    bandwidth = f"memory read bandwidth {measure_bandwidth():.0f} GB/s" if args.device == "cpu" else args.device
    print(f"threads {args.threads}, {args.layers} layers, prompt {args.prompt_tokens}, {args.new_tokens} new tokens, "
          f"{bandwidth}")
    print(f"{'variant':<10} {'batch':>5} {'engine tok/s (min-max)':>26} {'transformers tok/s':>26} {'ratio':>6} "
          f"{'GB/s':>6} {'prefill eng/hf tok/s':>22}")
    max_len = args.prompt_tokens + args.new_tokens + 1
    for name in args.variants.split(","):
        model = build(args.layers, args.device)
        apply_variant(model, name)
        step_bytes = decode_bytes_per_step(model)
        gen = torch.Generator().manual_seed(0)
        for batch in batches:
            ids = torch.randint(0, 32000, (batch, args.prompt_tokens), generator=gen).to(args.device)
            engine, baseline = _Runner(model, batch, max_len, True, "auto"), _Runner(model, batch, max_len, False, "auto")
            decode_seconds(engine, ids, 4), decode_seconds(baseline, ids, 4)  # warm-up (kernels repack once)
            ours, theirs, pre_ours, pre_theirs = [], [], [], []
            for _ in range(args.repeats):  # interleaved
                ours.append(batch * (args.new_tokens - 1) / decode_seconds(engine, ids, args.new_tokens - 1))
                theirs.append(batch * (args.new_tokens - 1) / decode_seconds(baseline, ids, args.new_tokens - 1))
                if batch == 1:
                    pre_ours.append(args.prompt_tokens / prefill_seconds(engine, ids))
                    pre_theirs.append(args.prompt_tokens / prefill_seconds(baseline, ids))
            gbps = step_bytes * statistics.median(ours) / batch / 1e9
            prefill = f"{statistics.median(pre_ours):.0f}/{statistics.median(pre_theirs):.0f}" if pre_ours else ""
            print(f"{name:<10} {batch:>5} {fmt(ours):>26} {fmt(theirs):>26} "
                  f"{statistics.median(ours) / statistics.median(theirs):>5.2f}x {gbps:>6.1f} {prefill:>22}", flush=True)
        del model


if __name__ == "__main__":
    main()
