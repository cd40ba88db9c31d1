"""Peak memory and wall time of calibrated quantization (GPTQ, AWQ, SmoothQuant) against model size.

    python benchmarks/calibration_memory.py [--hidden 1024 --layers 8 --n-samples 32 --seq-len 512 --methods gptq,awq,smoothquant]

Builds a random Llama-shaped model in-process (no download), quantizes it with each method (int4
g128 for GPTQ/AWQ, W8A8 for SmoothQuant) and prints the model's bytes, the peak RSS growth while
quantizing (the block-by-block driver holds one block's statistics and the calibration
activations, not a second copy of the model) and the time.
"""

from __future__ import annotations

import argparse
import time

import torch

import slimlm
from slimlm.eval.memory import PeakMemory
from slimlm.eval.size import parameter_count, weight_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--methods", default="gptq,awq,smoothquant")
    args = p.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75) // 64 * 64,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 256), vocab_size=args.vocab,
                         max_position_embeddings=max(2048, args.seq_len))
    ids = torch.randint(0, args.vocab, (args.n_samples * args.seq_len * 2,))
    activations = args.n_samples * args.seq_len * args.hidden * 4
    for method in args.methods.split(","):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
        before = weight_bytes(model)
        settings = {} if method == "smoothquant" else dict(bits=4, group_size=128)
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            slimlm.quantize(model, method, calibration=ids, n_samples=args.n_samples, seq_len=args.seq_len, **settings)
            seconds = time.perf_counter() - t0
        print(f"{method}: model {parameter_count(model) / 1e6:.0f}M parameters, fp32 {before / 1e6:.0f} MB "
              f"-> {weight_bytes(model) / 1e6:.0f} MB; calibration {args.n_samples} x {args.seq_len} tokens "
              f"(block inputs {activations / 1e6:.0f} MB); peak RSS growth {mem.peak_bytes / 1e6:.0f} MB; "
              f"{seconds:.1f} s on {torch.get_num_threads()} threads", flush=True)
        del model

if __name__ == "__main__":
    main()
