"""Structured pruning that changes shapes: attention heads, MLP channels, whole blocks. The result is
a smaller dense model whose config.json says the new sizes, so it loads in plain transformers and
runs faster with no sparse kernel.

By default every layer loses the same number of units, so one config describes the model:
  - heads: with grouped-query attention (G query heads per key/value head) each group loses the
    same number of query heads (K/V projections and the KV cache stay); when that rounds to none
    or all of a group (G = 1, or G = 2 at 25%), whole groups go, keys and values with them;
  - channels: MLP intermediate channels (rows of gate/up, columns of down); with scope 'global' the
    channels of all layers are ranked together, so layers keep different numbers, recorded per layer
    in config.json (`slimlm_module_shapes`) for `slimlm.load`;
  - blocks: whole transformer blocks, those whose output is most similar to their input (Block
    Influence BI = 1 - E[cos(x_in, x_out)], Men et al., "ShortGPT", arXiv 2403.03853; Gromov et al.,
    arXiv 2403.17887, prune by the same angular-distance idea).
Importance of a head or channel:
  - magnitude: the L2 norms of the weights that read and write the unit (channels:
    ‖gate_c‖·‖up_c‖·‖down_:,c‖; heads: ‖q rows‖·‖o columns‖);
  - activation: the mean L2 norm of the unit's output on calibration text times the norm of the
    weights that write it back (Wanda's |W|·‖X‖ at the granularity of a unit);
  - gradient: |Σ w·∂L/∂w| over the unit's weights (first-order Taylor of removing it, LLM-Pruner,
    arXiv 2305.11627), summed over calibration batches.
Llama-family layouts with separate projections (Llama, Mistral, Qwen2/3); fused projections (Phi-3)
and other layouts are refused with a clear error.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from slimlm.core import format as F
from slimlm.core.calibrate import CalibrationFields
from slimlm.core.config import Config, check, field
from slimlm.core.distributed import sum_
from slimlm.core.errors import SlimError
from slimlm.core.layers import find_blocks, keep_blocks_
from slimlm.core.steps import Step
from slimlm.pruning.gradients import weight_gradient_products

IMPORTANCE = ("magnitude", "activation", "gradient")


@dataclasses.dataclass(frozen=True)
class StructuredConfig(CalibrationFields, Config):
    """sparsity: the fraction of heads / channels / blocks removed (rounded to whole units)."""

    name = "structured"
    sparsity: float = field(0.25, "fraction of the heads / channels / blocks removed (rounded to whole units)")
    importance: str = field("magnitude", "how heads and channels are ranked: magnitude, activation or gradient "
                                         "(blocks use Block Influence)")
    scope: str = field("layer", "channels: 'global' ranks all layers' channels together (layers end up different sizes)")

    def __post_init__(self) -> None:
        CalibrationFields.__post_init__(self)
        check(self.scope in ("layer", "global"), f"scope '{self.scope}' must be layer or global")
        check(isinstance(self.sparsity, (int, float)) and not isinstance(self.sparsity, bool) and 0 < self.sparsity < 1,
              f"sparsity {self.sparsity!r} must be in (0, 1), e.g. 0.25")
        check(self.importance in IMPORTANCE, f"importance '{self.importance}' must be one of {', '.join(IMPORTANCE)}")

    def describe(self) -> str:
        return f"{self.name} {self.sparsity:.0%}"


@dataclasses.dataclass(frozen=True)
class HeadsConfig(StructuredConfig):
    name = "heads"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.scope == "layer", "heads are removed evenly from every layer; scope 'global' applies to channels")


@dataclasses.dataclass(frozen=True)
class ChannelsConfig(StructuredConfig):
    name = "channels"


@dataclasses.dataclass(frozen=True)
class BlocksConfig(StructuredConfig):
    name = "blocks"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.scope == "layer", "scope 'global' applies to channels, not blocks")
        check(self.importance in ("magnitude", "activation"),
              "blocks are ranked by how much they change their input (Block Influence); importance 'gradient' does not apply")


def _layout(model: nn.Module) -> nn.ModuleList:
    _, blocks = find_blocks(model)
    block = blocks[0]
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    if not (all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
            and all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj"))):
        raise SlimError(f"structured pruning supports Llama-style blocks with separate q/k/v/o and gate/up/down "
                        f"projections; {type(model).__name__} has another layout (use unstructured pruning)")
    return blocks


def _linear(old: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None) -> nn.Linear:
    """A copy of `old` keeping output rows `rows` and input columns `cols` (index tensors)."""
    w = old.weight.data
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    new = nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if old.bias is not None:
        new.bias.data.copy_(old.bias.data[rows] if rows is not None else old.bias.data)
    return new


def _keep(scores: Tensor, remove: int) -> Tensor:
    """Sorted indices of the units kept: all but the `remove` lowest scores (ties: the later goes)."""
    order = torch.argsort(scores, descending=True, stable=True)
    return torch.sort(order[: scores.numel() - remove]).values


@torch.no_grad()
def _capture(model: nn.Module, samples: Tensor, modules: dict[str, nn.Module], batch_size: int,
             fn) -> dict[str, Tensor]:
    """Run the samples through the model and fold fn(input (M, K)) -> (units,) over every call of each
    module (e.g. the down projection's input: the MLP's channel activations); means over batches."""
    sums: dict[str, Tensor] = {}
    hooks = []
    for name, module in modules.items():
        def hook(mod, args, _name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[_name] = sums.get(_name, 0) + fn(x)
        hooks.append(module.register_forward_pre_hook(hook))
    _run_with_hooks(model, samples, batch_size, hooks)
    return {name: sum_(total) for name, total in sums.items()}  # over every process's calibration batches


@torch.no_grad()
def _run_with_hooks(model: nn.Module, samples: Tensor, batch_size: int, hooks: list) -> None:
    """Run the samples through the model, then remove the hooks (even on error)."""
    device = next(model.parameters()).device
    try:
        for batch in samples.split(batch_size):
            model(batch.to(device))
    finally:
        for h in hooks:
            h.remove()


def channel_scores(model: nn.Module, config: StructuredConfig, samples: Tensor | None) -> list[Tensor]:
    blocks = _layout(model)
    mlps = [b.mlp for b in blocks]
    if config.importance == "magnitude":
        return [m.gate_proj.weight.float().norm(dim=1) * m.up_proj.weight.float().norm(dim=1)
                * m.down_proj.weight.float().norm(dim=0) for m in mlps]
    if config.importance == "activation":
        norms = _capture(model, samples, {str(i): m.down_proj for i, m in enumerate(mlps)}, config.batch_size,
                         lambda x: x.norm(dim=0))  # (I,): ‖h_c‖ over the batch's tokens
        return [norms[str(i)] * m.down_proj.weight.float().norm(dim=0) for i, m in enumerate(mlps)]
    params = [p for m in mlps for p in (m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)]
    g = weight_gradient_products(model, samples, params, config.batch_size)
    return [(g[3 * i].sum(1) + g[3 * i + 1].sum(1) + g[3 * i + 2].sum(0)).abs() for i in range(len(mlps))]


@torch.no_grad()
def prune_channels_(model: nn.Module, config: StructuredConfig, samples: Tensor | None = None, on_block=None) -> nn.Module:
    blocks = _layout(model)
    scores = channel_scores(model, config, samples)
    size = blocks[0].mlp.gate_proj.out_features
    remove = int(round(size * config.sparsity))
    check(0 < remove < size, f"removing {config.sparsity:.0%} of {size} channels leaves none or removes none")
    if config.scope == "global":  # one threshold over all layers' channels; every layer keeps at least one
        # each layer's scores relative to its own mean: raw magnitudes and activations differ in scale
        # from layer to layer, and a raw global ranking strips the small-scale layers bare
        scores = [s / s.mean().clamp(min=1e-12) for s in scores]
        flat = torch.cat(scores)
        threshold = torch.sort(flat).values[remove * len(blocks) - 1]
        removals = [min(int((s <= threshold).sum()), size - 1) for s in scores]
    else:
        removals = [remove] * len(blocks)
    for block, s, r in zip(blocks, scores, removals):
        keep = _keep(s, r).to(block.mlp.gate_proj.weight.device)
        mlp = block.mlp
        mlp.gate_proj, mlp.up_proj = _linear(mlp.gate_proj, rows=keep), _linear(mlp.up_proj, rows=keep)
        mlp.down_proj = _linear(mlp.down_proj, cols=keep)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = size - r
    sizes = {size - r for r in removals}
    if len(sizes) == 1:
        model.config.intermediate_size = sizes.pop()
    else:  # one config cannot say it: record each layer's shapes, which slimlm.load restores
        path, _ = find_blocks(model)
        setattr(model.config, F.MODULE_SHAPES, F.shapes_block({
            f"{path}.{i}.mlp.{proj}": list(getattr(b.mlp, proj).weight.shape)
            for i, b in enumerate(blocks) for proj in ("gate_proj", "up_proj", "down_proj")}))
    return model


def _head_geometry(model: nn.Module) -> tuple[int, int, int]:
    c = model.config
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(_layout(model)[0].self_attn, "head_dim", None) or c.hidden_size // heads
    return heads, kv, head_dim


def head_scores(model: nn.Module, config: StructuredConfig, samples: Tensor | None) -> list[Tensor]:
    """Per layer, one score per query head (H,)."""
    heads, _, d = _head_geometry(model)
    attns = [b.self_attn for b in _layout(model)]

    def per_head_rows(w: Tensor) -> Tensor:  # (H*D, C) -> (H,)
        return w.float().view(heads, d, -1).pow(2).sum((1, 2)).sqrt()

    def per_head_cols(w: Tensor) -> Tensor:  # (C, H*D) -> (H,)
        return w.float().view(w.shape[0], heads, d).pow(2).sum((0, 2)).sqrt()

    if config.importance == "magnitude":
        return [per_head_rows(a.q_proj.weight) * per_head_cols(a.o_proj.weight) for a in attns]
    if config.importance == "activation":
        norms = _capture(model, samples, {str(i): a.o_proj for i, a in enumerate(attns)}, config.batch_size,
                         lambda x: x.view(x.shape[0], heads, d).pow(2).sum((0, 2)).sqrt())
        return [norms[str(i)] * per_head_cols(a.o_proj.weight) for i, a in enumerate(attns)]
    params = [p for a in attns for p in (a.q_proj.weight, a.o_proj.weight)]
    g = weight_gradient_products(model, samples, params, config.batch_size)
    return [(g[2 * i].view(heads, d, -1).sum((1, 2)) + g[2 * i + 1].view(-1, heads, d).sum((0, 2))).abs()
            for i in range(len(attns))]


@torch.no_grad()
def prune_heads_(model: nn.Module, config: StructuredConfig, samples: Tensor | None = None, on_block=None) -> nn.Module:
    heads, kv, d = _head_geometry(model)
    group = heads // kv
    scores = head_scores(model, config, samples)
    per_group = int(round(group * config.sparsity))
    whole = int(round(kv * config.sparsity))  # whole key/value groups (with their query heads)
    if group > 1 and 0 < per_group < group:
        mode = "query"  # the same number of query heads from every group; K/V and the cache stay
    elif 0 < whole < kv:
        mode = "group"
    else:
        raise SlimError(f"removing {config.sparsity:.0%} of {heads} heads ({kv} key/value heads, groups of {group}) "
                        "removes none or all of a group; change the sparsity")
    for block, s in zip(_layout(model), scores):
        attn = block.self_attn
        dev = attn.q_proj.weight.device
        if mode == "query":
            kept = torch.cat([g * group + _keep(s[g * group:(g + 1) * group], per_group) for g in range(kv)])
            kept_kv = torch.arange(kv)
        else:
            kept_kv = _keep(s.view(kv, group).sum(1), whole)
            kept = (kept_kv[:, None] * group + torch.arange(group)).reshape(-1)
        rows = (kept[:, None] * d + torch.arange(d)).reshape(-1).to(dev)  # the heads' rows in q (and o's columns)
        kv_rows = (kept_kv[:, None] * d + torch.arange(d)).reshape(-1).to(dev)
        attn.q_proj, attn.o_proj = _linear(attn.q_proj, rows=rows), _linear(attn.o_proj, cols=rows)
        if mode == "group":
            attn.k_proj, attn.v_proj = _linear(attn.k_proj, rows=kv_rows), _linear(attn.v_proj, rows=kv_rows)
        new_heads, new_kv = len(kept), len(kept_kv)
        attn.num_key_value_groups = new_heads // new_kv
        for name, value in (("num_heads", new_heads), ("num_key_value_heads", new_kv)):
            if hasattr(attn, name):
                setattr(attn, name, value)
    model.config.head_dim = d  # no longer hidden_size / heads
    model.config.num_attention_heads = len(kept)
    model.config.num_key_value_heads = len(kept_kv)
    return model


@torch.no_grad()
def block_influence(model: nn.Module, samples: Tensor, batch_size: int = 1) -> Tensor:
    """BI per block (L,): 1 - mean over tokens of cos(block input, block output)."""
    _, blocks = find_blocks(model)
    sums = torch.zeros(len(blocks))
    counts = torch.zeros(len(blocks))
    hooks = []
    for i, block in enumerate(blocks):
        def hook(mod, args, kwargs, output, _i=i):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x.float().flatten(0, -2), y.float().flatten(0, -2), dim=-1)
            sums[_i] += float(cos.sum())
            counts[_i] += cos.numel()
        hooks.append(block.register_forward_hook(hook, with_kwargs=True))
    _run_with_hooks(model, samples, batch_size, hooks)
    return 1 - sum_(sums) / sum_(counts)


@torch.no_grad()
def prune_blocks_(model: nn.Module, config: StructuredConfig, samples: Tensor | None = None, on_block=None) -> nn.Module:
    path, blocks = find_blocks(model)
    remove = int(round(len(blocks) * config.sparsity))
    check(0 < remove < len(blocks), f"removing {config.sparsity:.0%} of {len(blocks)} blocks removes none or all")
    kept = _keep(block_influence(model, samples, config.batch_size), remove).tolist()
    return keep_blocks_(model, kept)


def _needs_data(config: StructuredConfig) -> bool:
    return config.importance != "magnitude"


def structured_step(config_cls: type[StructuredConfig], prune, calibrated, summary: str) -> Step:
    """A step that shrinks the model with `prune` and records how the units were chosen on model.config."""

    def apply(model: nn.Module, config: StructuredConfig, samples: Tensor | None = None, on_block=None) -> nn.Module:
        prune(model, config, samples, on_block)
        setattr(model.config, F.STRUCTURED, {"version": F.STRUCTURED_VERSION, "method": config.name,
                                             "sparsity": config.sparsity, "importance": config.importance})
        return model

    return Step(config_cls, apply, "prune", calibrated=calibrated, summary=summary)


CHANNELS = structured_step(ChannelsConfig, prune_channels_, _needs_data, "remove MLP channels (the model shrinks)")
HEADS = structured_step(HeadsConfig, prune_heads_, _needs_data, "remove attention heads (the model shrinks)")
BLOCKS = structured_step(BlocksConfig, prune_blocks_, True,
                         "remove whole blocks by Block Influence (ShortGPT, arXiv 2403.03853)")
