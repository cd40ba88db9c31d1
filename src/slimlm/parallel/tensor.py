"""Tensor parallelism for the Llama family (Megatron-LM, Shoeybi et al., arXiv 1909.08053, §3):
each rank holds a slice of every layer's matrices.

  column-parallel  q/k/v and gate/up: a rank computes its own heads and intermediate channels;
  row-parallel     o_proj and down_proj: a rank multiplies its slice of the inputs, and the partial
                   outputs are summed across ranks (one all-reduce after attention, one after the
                   MLP: `DecoderPlan.reduce`).
Attention heads are split evenly; grouped-query key/value heads are split too when there are at least
as many as ranks, else each rank keeps the one key/value head its query heads read (replicated).
Norms, the embedding and the output head are replicated: on one machine's cores a vocab-parallel
head would halve the head's reads but add an all-gather of the logits to every step, and
`benchmarks/parallel_speed.py` measures which wins (see the README).

The plan is data: `SPLITS` names each projection's role, and `TPLayout` turns roles into index
ranges from the decoder spec, so no architecture has code of its own. Quantized layers split their
portable codes (`CompressedLinear.shard`); a split that would cut a quantization group is refused.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from slimlm.core.errors import SlimError
from slimlm.core.layers import is_compressed, replace_module_
from slimlm.engine.decoder import DecoderSpec

# projection name -> (how it is split, which index set it is split by)
SPLITS: dict[str, tuple[str, str]] = {
    "q_proj": ("column", "q"), "k_proj": ("column", "kv"), "v_proj": ("column", "kv"),
    "qkv_proj": ("column", "qkv"), "o_proj": ("row", "q"),
    "gate_proj": ("column", "mlp"), "up_proj": ("column", "mlp"), "gate_up_proj": ("column", "gate_up"),
    "down_proj": ("row", "mlp"),
}
DIMS = {"column": 0, "row": 1}  # the weight (out, in) dimension each split cuts


@dataclasses.dataclass(frozen=True)
class TPLayout:
    """Which heads and channels rank `rank` of `world` holds."""

    world: int
    rank: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int

    @classmethod
    def for_spec(cls, spec: DecoderSpec, intermediate: int, world: int, rank: int) -> "TPLayout":
        if world < 1 or not 0 <= rank < world:
            raise SlimError(f"tensor-parallel rank {rank} of {world} is impossible")
        h, kv = spec.n_heads, spec.n_kv_heads
        if h % world:
            raise SlimError(f"--tp {world} does not divide the model's {h} attention heads; use a divisor of {h}")
        if kv % world and world % kv:
            raise SlimError(f"--tp {world} neither divides the model's {kv} key/value heads nor is a multiple of them")
        if intermediate % world:
            raise SlimError(f"--tp {world} does not divide the model's {intermediate} MLP channels")
        return cls(world, rank, h, kv, spec.head_dim, intermediate)

    @property
    def q_heads(self) -> range:
        per = self.n_heads // self.world
        return range(self.rank * per, (self.rank + 1) * per)

    @property
    def kv_heads(self) -> range:
        """The key/value heads this rank's query heads read (a slice, or one replicated head)."""
        group = self.n_heads // self.n_kv_heads  # query heads per key/value head
        return range(self.q_heads.start // group, (self.q_heads.stop - 1) // group + 1)

    def ranges(self, index_set: str) -> list[tuple[int, int]]:
        """Index ranges (along a projection's outputs or inputs) of `index_set` this rank keeps."""
        d, i = self.head_dim, self.intermediate
        q = (self.q_heads.start * d, self.q_heads.stop * d)
        kv = (self.kv_heads.start * d, self.kv_heads.stop * d)
        mlp = (self.rank * i // self.world, (self.rank + 1) * i // self.world)
        qkv_k, qkv_v = self.n_heads * d, (self.n_heads + self.n_kv_heads) * d
        return {
            "q": [q], "kv": [kv], "mlp": [mlp],
            "qkv": [q, (qkv_k + kv[0], qkv_k + kv[1]), (qkv_v + kv[0], qkv_v + kv[1])],
            "gate_up": [mlp, (i + mlp[0], i + mlp[1])],
        }[index_set]

    def local_spec(self, spec: DecoderSpec) -> DecoderSpec:
        """The decoder spec of this rank's shard (its heads)."""
        return dataclasses.replace(spec, n_heads=len(self.q_heads), n_kv_heads=len(self.kv_heads))


class VocabParallelHead(nn.Module):
    """The output head split along the vocabulary: each rank computes the logits of its rows, which are
    gathered (every rank gets the full logits). comm, if given, times the gather."""

    def __init__(self, shard: nn.Module, world: int, comm=None) -> None:
        super().__init__()
        self.shard, self.world, self.comm = shard, world, comm

    @property
    def in_features(self) -> int:
        return self.shard.in_features

    @property
    def out_features(self) -> int:
        return self.shard.out_features * self.world

    def forward(self, x):
        import time

        import torch
        import torch.distributed as dist

        local = self.shard(x).contiguous()  # (..., V / world)
        parts = [torch.empty_like(local) for _ in range(self.world)]
        t0 = time.perf_counter()
        dist.all_gather(parts, local)
        if self.comm is not None:
            self.comm.seconds += time.perf_counter() - t0
        return torch.cat(parts, -1)


def sharded_modules(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Full name -> (split, index set) of every projection inside the blocks that tensor parallelism splits."""
    return {name: SPLITS[name.rpartition(".")[2]] for name, _ in model.model.layers.named_modules(prefix="model.layers")
            if name.rpartition(".")[2] in SPLITS}


def shard_linear(layer: nn.Module, dim: int, ranges: list[tuple[int, int]], keep_bias: bool, name: str) -> nn.Module:
    """The shard of a float or compressed linear layer keeping outputs (dim 0) or inputs (dim 1) `ranges`."""
    if is_compressed(layer):
        return layer.shard(dim, ranges, keep_bias, name)
    if not isinstance(layer, nn.Linear):
        raise SlimError(f"{name}: tensor parallelism splits nn.Linear and slimlm's compressed layers, not "
                        f"{type(layer).__name__}")
    import torch

    def take(t, d):
        return torch.cat([t.narrow(d, a, b - a) for a, b in ranges], d)

    weight = take(layer.weight.data, dim)
    bias = layer.bias is not None and (dim == 0 or keep_bias)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias, device="meta", dtype=weight.dtype)
    new.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias:
        new.bias = nn.Parameter((take(layer.bias.data, 0) if dim == 0 else layer.bias.data).clone(),
                                requires_grad=False)
    return new


def shard_model_(model: nn.Module, layout: TPLayout) -> nn.Module:
    """Replace every split projection of `model` (a whole model in memory) by this rank's shard, in place.
    (`loading.load_tp_shard` builds the same shards reading only their slices from the files.)"""
    for name, (split, index_set) in sharded_modules(model).items():
        layer = model.get_submodule(name)
        replace_module_(model, name, shard_linear(layer, DIMS[split], layout.ranges(index_set),
                                                  keep_bias=layout.rank == 0, name=name))
    return model
