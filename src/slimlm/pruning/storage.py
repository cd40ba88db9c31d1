"""Compact storage of pruned weights: a bitmask of the kept positions plus the kept values.

A pruned layer's `weight` (N, K) is saved as `weight.bitmask` uint8 (N, ceil(K/8)), bit j of byte
k//8 set where column 8k+j is kept (little bit order), and `weight.values` (nnz,) in the weight's
dtype, row-major. At 50% sparsity that is 1/8 + 1/2 of the dense bytes (bf16: 1.125 instead of 2
bytes per weight). compressed-tensors 0.20 no longer ships its sparse-bitmask compressor (only the
config class), so this is slimlm's own format, read back by `slimlm.load`; loading restores the
dense weight exactly (tested). Quantized layers keep their packed codes (the zeros are codes there).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimlm.core import format as F

SUFFIXES = (".bitmask", ".values")


def pack_bitmask(w: Tensor) -> tuple[Tensor, Tensor]:
    """(bitmask uint8 (N, ceil(K/8)), values (nnz,)) of a 2-D weight."""
    n, k = w.shape
    keep = w != 0
    padded = torch.zeros(n, (k + 7) // 8 * 8, dtype=torch.uint8)
    padded[:, :k] = keep.to(torch.uint8)
    weights = (2 ** torch.arange(8, dtype=torch.int32)).to(torch.uint8)  # bit j <- column 8i+j
    bitmask = (padded.view(n, -1, 8) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)
    return bitmask, w[keep].contiguous()


def unpack_bitmask(bitmask: Tensor, values: Tensor, k: int) -> Tensor:
    """The dense weight (N, K) back from `pack_bitmask`'s output."""
    n = bitmask.shape[0]
    bits = (bitmask[..., None].to(torch.int32) >> torch.arange(8, dtype=torch.int32)) & 1  # (N, K8/8, 8)
    keep = bits.view(n, -1)[:, :k].bool()
    w = torch.zeros(n, k, dtype=values.dtype)
    w[keep] = values
    return w


def encode_sparse_(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Replace the dense weights of the pruned layers named in config.slimlm_sparsity by bitmask +
    values, where that is smaller; in place on the state dict about to be written."""
    record = getattr(model.config, F.SPARSITY, None) or {}
    stored = []
    for layer in record.get("targets", []):
        key = f"{layer}.weight"
        w = state.get(key)
        if w is None or w.dim() != 2 or not w.is_floating_point():
            continue  # quantized, or tied to something else
        bitmask, values = pack_bitmask(w)
        if bitmask.numel() + values.numel() * values.element_size() >= w.numel() * w.element_size():
            continue
        del state[key]
        state[key + ".bitmask"], state[key + ".values"] = bitmask, values
        state[key + ".shape"] = torch.tensor(w.shape, dtype=torch.int64)
        stored.append(layer)
    if stored:
        record["storage"] = {"format": "bitmask", "layers": stored}
    else:
        record.pop("storage", None)


def decode_sparse_(raw: dict, state: dict[str, Tensor]) -> None:
    """Turn bitmask + values entries back into dense weights, in place on a loaded state dict."""
    for key in [k for k in state if k.endswith(".bitmask")]:
        base = key[: -len(".bitmask")]
        shape = state.pop(base + ".shape").tolist()
        state[base] = unpack_bitmask(state.pop(key), state.pop(base + ".values"), shape[1]).view(shape)

