"""Peak resident memory of `slimlm generate` on a compressed folder, against what it must hold: the
folder's weight bytes plus the KV cache of the run.

    python benchmarks/generate_memory.py FOLDER [--rounds 3 --new-tokens 64]

The command's fixed cost (the interpreter, torch, transformers' model code, the tokenizer, the CLI)
does not grow with the model, so it is measured by the same command on the built-in demo model
(14 MB of weights), in the same rounds, and taken off:

    held = (peak(FOLDER) - peak(demo)) / (weights(FOLDER) + KV(FOLDER) - weights(demo) - KV(demo))

1.0 would be the weights and the cache and nothing else; issue 16's bar is 1.15. Peak is the child's
ru_maxrss (VmHWM), each run its own process, the two commands alternating.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PROMPT = "Once upon a time there was a little girl who lived in a village near the forest. " * 8


def peak_mb(model: str, new_tokens: int) -> float:
    cmd = [sys.executable, "-m", "slimlm", "generate", model, PROMPT, "-n", str(new_tokens), "--threads", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if status:
        raise SystemExit(f"{' '.join(cmd[:5])} failed:\n{err[-2000:]}")
    return usage.ru_maxrss / 1024  # KiB on Linux


def held_bytes(model: str, new_tokens: int) -> tuple[float, float]:
    """(weight bytes, KV cache bytes of this run) of a model folder or 'demo'."""
    import torch

    from slimlm.commands._common import quiet_libraries
    from slimlm.core.files import SafetensorsReader
    from slimlm.core.model_io import load_tokenizer, read_config_json, resolve_model_path

    quiet_libraries()

    path = resolve_model_path(model)
    reader = SafetensorsReader(path)
    weights = sum(reader.nbytes(name) for name in reader.where)
    raw = read_config_json(path)
    config = raw.get("text_config", raw)
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    tokens = len(load_tokenizer(path)(PROMPT)["input_ids"]) + new_tokens + 1
    dtype = getattr(torch, str(raw.get("dtype", raw.get("torch_dtype", "float32"))).replace("torch.", ""))
    kv = 2 * config["num_hidden_layers"] * kv_heads * head_dim * tokens * dtype.itemsize
    return weights, kv


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    peaks: dict[str, list[float]] = {args.folder: [], "demo": []}
    for r in range(args.rounds):
        for model in (peaks if r % 2 == 0 else list(peaks)[::-1]):
            peaks[model].append(peak_mb(model, args.new_tokens))
        print(f"round {r + 1}: " + ", ".join(f"{m}: {v[-1]:.0f} MB" for m, v in peaks.items()), flush=True)
    (w, kv), (w0, kv0) = held_bytes(args.folder, args.new_tokens), held_bytes("demo", args.new_tokens)
    peak, base = statistics.median(peaks[args.folder]), statistics.median(peaks["demo"])
    held = (peak - base) * 2**20 / (w + kv - w0 - kv0)
    print(json.dumps({"folder": args.folder, "peak_mb": round(peak), "demo_peak_mb": round(base),
                      "weights_mb": round(w / 2**20, 1), "kv_mb": round(kv / 2**20, 1), "held_per_byte": round(held, 3)}))
    print(f"peak {peak:.0f} MB, demo {base:.0f} MB; weights {w / 2**20:.0f} MB + KV {kv / 2**20:.1f} MB: "
          f"{held:.2f}x of what the run must hold (bar 1.15x)")


if __name__ == "__main__":
    main()
