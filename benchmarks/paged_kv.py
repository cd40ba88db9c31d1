"""How many concurrent sequences fit in the same KV-cache memory, contiguous against paged.

    python benchmarks/paged_kv.py [--memory-gib 4 --max-len 2048 --lengths 256,512,1024]

A contiguous cache reserves `max_len` tokens for every sequence, whatever it holds; the paged cache
hands out blocks of `--block-size` tokens as the tokens arrive. For a cache of --memory-gib, both are
filled for real: sequences of each length are prefilled, one after another, until the engine refuses
(`CacheFull`). The model has TinyLlama-1.1B's KV geometry (22 layers, 4 KV heads of 64, bfloat16:
22.5 KB per token) with small other dimensions, so the fill is quick; the counts depend on the
cache's geometry alone. Also reports the int8 cache (`--kv-dtype int8`).
"""

from __future__ import annotations

import argparse

import torch


def kv_shaped_model():
    """Random weights with TinyLlama-1.1B's cache geometry and a small residual stream."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=22, num_attention_heads=4,
                         num_key_value_heads=4, head_dim=64, vocab_size=320, max_position_embeddings=4096)
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def fill(engine, length: int) -> int:
    """Prefill sequences of `length` tokens into free slots until the cache refuses; how many fit."""
    from slimlm.engine.kv_cache import CacheFull

    prompt = torch.randint(1, 300, (length,), generator=torch.Generator().manual_seed(length))
    held = 0
    for slot in range(len(engine.lengths)):
        try:
            engine.prefill(slot, prompt)
        except CacheFull:
            break
        held += 1
    for slot in range(held):
        engine.release(slot)
    return held


def main() -> None:
    from slimlm.engine.engine import Engine

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--memory-gib", type=float, default=4.0)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--lengths", default="256,512,1024,2000")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = kv_shaped_model()
    lengths = [int(x) for x in args.lengths.split(",")]
    print(f"KV cache of {args.memory_gib:g} GiB, sequences of up to {args.max_len} tokens, TinyLlama-1.1B's KV geometry")
    print(f"{'cache':<8} {'bytes/token':>11} {'length':>7} {'contiguous':>11} {'paged':>7} {'ratio':>6}")
    for kv_dtype in ("auto", "int8"):
        probe = Engine(model, slots=1, max_len=args.max_len, kv_dtype=kv_dtype, block_size=args.block_size,
                       kv_tokens=args.block_size)
        per_token = probe.cache.token_bytes()
        del probe
        tokens = int(args.memory_gib * 2**30 // per_token)
        contiguous_slots = tokens // args.max_len  # one block of max_len per sequence
        contiguous = Engine(model, slots=contiguous_slots + 8, max_len=args.max_len, kv_dtype=kv_dtype,
                            block_size=args.max_len, kv_tokens=contiguous_slots * args.max_len)
        for length in lengths:
            before = fill(contiguous, length)
            paged = Engine(model, slots=tokens // length + 8, max_len=args.max_len, kv_dtype=kv_dtype,
                           block_size=args.block_size, kv_tokens=tokens)
            after = fill(paged, length)
            del paged
            name = "bf16" if kv_dtype == "auto" else "int8"
            print(f"{name:<8} {per_token:>11} {length:>7} {before:>11} {after:>7} {after / before:>5.1f}x")
        del contiguous


if __name__ == "__main__":
    main()
