"""Function-preserving per-channel rescaling of linear layers' inputs, shared by AWQ (arXiv
2306.00978, §3.2) and SmoothQuant (arXiv 2211.10438, §4).

Layers that read the same input x (T, K) compute x Wᵀ = (x / s)(W · s)ᵀ for any positive s (K,):
their weight columns can be multiplied by s for free if the op that produced x divides its output
channels by s. Which op that is, is found per block without architecture tables:
  - a module of the block whose output *is* the layers' input tensor and that has a (K,) weight
    (a LayerNorm/RMSNorm, whose weight and bias are divided by s), else
  - a linear layer of the block with K outputs whose rows are divided by s (Llama v_proj -> o_proj,
    up_proj -> down_proj; OPT fc1 -> fc2 through ReLU).
Every candidate is checked numerically before it is used: random scales are folded in, the block
is run, and the fold is kept only if the block computes the same thing. So a norm computing
x·(1 + w) (Gemma), GELU between fc1 and fc2, or grouped-query v_proj -> o_proj are rejected, and
the layers they feed keep their inputs unscaled (the fallback, logged by the caller).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from slimlm.core.layers import block_output, in_features, is_linear, out_features, weight_matrix


@dataclasses.dataclass
class ScaleGroup:
    """Target layers (full names) reading one input, and the module (full name) that produces it."""

    producer: str
    layers: list[str]


@torch.no_grad()
def fold_scales_(producer: nn.Module, layers: list[nn.Module], s: Tensor) -> None:
    """Divide the producer's output channels by s (K,) and multiply the layers' input columns by s."""
    if is_linear(producer):
        w = weight_matrix(producer)  # (out, in) view
        w.div_(s.to(w.dtype)[:, None])
    else:
        producer.weight.div_(s.to(producer.weight.dtype))
    bias = getattr(producer, "bias", None)
    if isinstance(bias, Tensor):
        bias.div_(s.to(bias.dtype))
    for layer in layers:
        w = weight_matrix(layer)  # (out, in) view
        w.mul_(s.to(w.dtype)[None, :])


def _fold_is_exact(block: nn.Module, args: tuple, kwargs: dict, producer: nn.Module, layers: list[nn.Module]) -> bool:
    """Fold random scales in, run the block, restore the weights: did the block's output stay the same?"""
    x = args[0]
    reference = block_output(block(*args, **kwargs))
    update = (reference.float() - x.float()).abs().max() if reference.shape == x.shape else reference.float().abs().max()
    saved = [p.detach().clone() for m in (producer, *layers) for p in m.parameters(recurse=False)]
    k = in_features(layers[0])
    g = torch.Generator().manual_seed(0)
    s = torch.exp(torch.empty(k).uniform_(-1.4, 1.4, generator=g)).to(x.device)  # in [1/4, 4]
    try:
        fold_scales_(producer, layers, s)
        changed = (block_output(block(*args, **kwargs)).float() - reference.float()).abs().max()
    finally:
        for p, old in zip((p for m in (producer, *layers) for p in m.parameters(recurse=False)), saved):
            p.data.copy_(old)
    tolerance = 1e-4 if reference.dtype == torch.float32 else 1e-2  # exact folds differ by rounding only
    return bool(changed <= tolerance * max(float(update), 1e-6))


@torch.no_grad()
def find_scale_groups(
    block: nn.Module, prefix: str, names: list[str], inputs: list[tuple]
) -> tuple[list[ScaleGroup], list[str]]:
    """Group the target layers `names` (full names inside `block`, whose names start with `prefix`)
    by shared input and find each group's producer. Returns the groups and the names left without
    a producer that can absorb scales."""
    args, kwargs = inputs[0]
    modules = {prefix + n: m for n, m in block.named_modules() if n}
    outputs: dict[str, Tensor] = {}
    layer_inputs: dict[str, Tensor] = {}
    handles = []
    for name, module in modules.items():
        if name in names:
            handles.append(module.register_forward_hook(
                lambda m, a, o, name=name: layer_inputs.__setitem__(name, a[0])))
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and weight.dim() == 1 and not is_linear(module):
            handles.append(module.register_forward_hook(lambda m, a, o, name=name: outputs.__setitem__(name, o)))
    try:
        block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    shared: list[tuple[Tensor, list[str]]] = []  # (input tensor, layers reading exactly it)
    for name in names:
        x = layer_inputs[name]
        for tensor, members in shared:
            if tensor is x:
                members.append(name)
                break
        else:
            shared.append((x, [name]))
    groups, orphans = [], []
    for x, members in shared:
        k = in_features(modules[members[0]])
        layers = [modules[n] for n in members]
        norms = [n for n, o in outputs.items() if o is x and modules[n].weight.numel() == k]
        linears = [n for n, m in modules.items() if is_linear(m) and n not in members and out_features(m) == k]
        for candidate in norms + linears:
            if _fold_is_exact(block, args, kwargs, modules[candidate], layers):
                groups.append(ScaleGroup(candidate, members))
                break
        else:
            orphans.extend(members)
    return groups, orphans
