"""Effect of the engine's int8 KV cache on quality, and the memory it saves.

    python benchmarks/kv_cache.py --model ../shared/eval-data/hf/stories260K \\
        --data ../shared/eval-data/corpora/tinystories_valid_first1000.txt@500: --tokens 20000

Teacher-forced evaluation on the engine: each window of --window tokens is fed in chunks of
--chunk tokens, every chunk attending to keys and values read back from the cache, once with the
cache in the model's dtype and once in int8. Prints perplexity under both, the KL divergence and
top-1 agreement of the int8 run against the full-precision one, and the cache bytes per token.
"""

from __future__ import annotations

import argparse
import math

import torch

import slimlm
from slimlm.core.data import load_tokens
from slimlm.engine.engine import Engine


def window_logits(engine: Engine, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Logits (T, V) of a window ids (T,) fed in chunks through slot 0 of `engine`."""
    engine.release(0)
    return torch.cat([engine.append(0, ids[i : i + chunk], all_logits=True, read_back=True)
                      for i in range(0, len(ids), chunk)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--data", default="demo")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--chunk", type=int, default=32)
    args = p.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model, tok = slimlm.load(args.model, dtype="float32")
    ids = load_tokens(args.data, tok, args.tokens)
    exact = Engine(model, max_len=args.window + 1)
    int8 = Engine(model, max_len=args.window + 1, kv_dtype="int8")
    nll = {"exact": 0.0, "int8": 0.0}
    kl_sum, agree, count = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, args.window):
            window = ids[start : start + args.window + 1]
            if len(window) < 2:
                break
            inputs, targets = window[:-1], window[1:]
            a = window_logits(exact, inputs, args.chunk).float().log_softmax(-1)  # (T, V)
            b = window_logits(int8, inputs, args.chunk).float().log_softmax(-1)
            nll["exact"] -= float(a.gather(-1, targets[:, None]).sum())
            nll["int8"] -= float(b.gather(-1, targets[:, None]).sum())
            kl_sum += float((a.exp() * (a - b)).sum())
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            count += len(targets)
    per_token = {name: e.cache.token_bytes() for name, e in (("exact", exact), ("int8", int8))}
    print(f"model {args.model}: {count} tokens, windows of {args.window}, chunks of {args.chunk}")
    print(f"{'kv cache':<10} {'ppl':>9} {'KL':>10} {'top-1':>8} {'bytes/token':>12}")
    print(f"{'float32':<10} {math.exp(nll['exact'] / count):>9.4f} {0:>10.6f} {100:>7.2f}% {per_token['exact']:>12.0f}")
    print(f"{'int8':<10} {math.exp(nll['int8'] / count):>9.4f} {kl_sum / count:>10.6f} {100 * agree / count:>7.2f}% "
          f"{per_token['int8']:>12.0f}  ({per_token['exact'] / per_token['int8']:.2f}x smaller)")


if __name__ == "__main__":
    main()
