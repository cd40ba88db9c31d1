"""The engine's decoder for the Llama family (Llama, Mistral, Qwen2, Qwen3, Phi-3): one loop over the
layers (`forward`) that calls a small set of swappable ops.

It reuses the loaded model's own modules (embeddings, norms, linear layers, whether nn.Linear or
compressed, and the rotary embedding, so every RoPE variant and scaling the model was built with
applies) and replaces only the attention plumbing. What differs between architectures (grouped-query
attention, QK-norm, fused q/k/v and gate/up projections, partial rotary dimensions, sliding windows,
biases) is a flag of `DecoderSpec` or a choice made once in `build_plan`, not a copy of the code.

The op sets (see `Ops`) are where the three ways of running a step differ:
  - `torch_ops.TorchOps`: plain PyTorch, any number of tokens (prefill and decode), the oracle;
  - `graphs.StaticOps`: one token per slot 0..B-1 with fixed shapes, for CUDA graph capture;
  - `fused.FusedOps`: one token per slot with the glue in C++ (CPU).
Fusion choices (q/k/v and gate/up through one kernel call) are made once, when the plan is built.
`decoder_spec` returns None (with a reason) for a model it does not cover; callers then use the
model's own forward.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn

from slimlm.core.layers import context_length, float_dtype, is_compressed, model_device

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3")


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scaling: float
    fused_qkv: bool  # Phi-3 qkv_proj
    fused_gate_up: bool  # Phi-3 gate_up_proj
    qk_norm: bool  # Qwen3 per-head RMSNorm of q and k before RoPE
    windows: tuple[int | None, ...]  # sliding window per layer (None: full attention)
    max_positions: int


def _window(model: nn.Module, attn: nn.Module) -> int | None:
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window  # Qwen2/Qwen3 decide per layer (layer_types)
    if model.config.model_type in ("mistral", "phi3"):
        return getattr(model.config, "sliding_window", None)
    return None


def decoder_spec(model: nn.Module) -> tuple[DecoderSpec | None, str]:
    """The flags of `model` if the engine can run it, else (None, why not)."""
    config = getattr(model, "config", None)
    if config is None or config.model_type not in SUPPORTED:
        return None, f"model type {getattr(config, 'model_type', '?')} is not in the engine's Llama family {SUPPORTED}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return None, f"activation {config.hidden_act} is not silu"
    base = getattr(model, "model", None)
    if not all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")) or not hasattr(model, "lm_head"):
        return None, "the model does not have the Llama module layout"
    attn, mlp = base.layers[0].self_attn, base.layers[0].mlp
    fused_qkv, fused_gate_up = hasattr(attn, "qkv_proj"), hasattr(mlp, "gate_up_proj")
    if not (fused_qkv or all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj"))) or not hasattr(attn, "o_proj"):
        return None, "attention projections not found"
    if not (fused_gate_up or all(hasattr(mlp, p) for p in ("gate_proj", "up_proj"))) or not hasattr(mlp, "down_proj"):
        return None, "MLP projections not found"
    head_dim = getattr(attn, "head_dim", None) or config.hidden_size // config.num_attention_heads
    spec = DecoderSpec(
        n_layers=len(base.layers), n_heads=config.num_attention_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads, head_dim=head_dim,
        scaling=getattr(attn, "scaling", head_dim**-0.5), fused_qkv=fused_qkv, fused_gate_up=fused_gate_up,
        qk_norm=hasattr(attn, "q_norm"), windows=tuple(_window(model, layer.self_attn) for layer in base.layers),
        max_positions=context_length(model) or 4096,
    )
    return spec, ""


# --- projections: several outputs from one input, fused where the kernel allows ----------------------


class Projection:
    """x (M, K) -> several outputs (M, N_j): q/k/v or gate/up. Built once per layer by `projection`."""

    def __call__(self, x: Tensor) -> list[Tensor]:
        raise NotImplementedError


@dataclasses.dataclass
class SplitProjection(Projection):
    """One linear layer whose output is split (Phi-3's qkv_proj and gate_up_proj)."""

    layer: nn.Module
    sizes: list[int]

    def __call__(self, x: Tensor) -> list[Tensor]:
        return list(self.layer(x).split(self.sizes, dim=-1))


@dataclasses.dataclass
class SeparateProjection(Projection):
    """One call per layer (float layers, or compressed layers that do not share a kernel)."""

    layers: list[nn.Module]

    def __call__(self, x: Tensor) -> list[Tensor]:
        return [layer(x) for layer in self.layers]


@dataclasses.dataclass
class KernelProjection(Projection):
    """Compressed layers sharing one kernel: the kernel's `run_many` serves them from one input in one
    call where it can (the int4 AVX-512 kernel runs q/k/v in one parallel region). A kernel with
    `bind` (cpu_int4_a8) resolves its arguments once per input dtype and decode steps call it directly:
    on a 1.1B model the per-layer Python path cost ~16 us a call, ~1.4 ms of a 25 ms step."""

    layers: list[nn.Module]
    kernel: Any
    bound: tuple | None = None  # (input dtype, fn) from kernel.bind

    def __call__(self, x: Tensor) -> list[Tensor]:
        rows = x.reshape(-1, x.shape[-1])  # (M, K)
        if rows.shape[0] < getattr(self.kernel, "dense_rows", 0) and hasattr(self.kernel, "bind"):
            if self.bound is None or self.bound[0] != rows.dtype:
                states = [layer.kernel_state(rows)[1] for layer in self.layers]
                self.bound = (rows.dtype, self.kernel.bind(self.layers, states))
            if self.bound[1] is not None:
                return self._finish(x, self.bound[1](rows))
        states = [layer.kernel_state(rows)[1] for layer in self.layers]
        return self._finish(x, self.kernel.run_many(rows, self.layers, states))  # [(M, N_j)]

    def _finish(self, x: Tensor, ys: list[Tensor]) -> list[Tensor]:
        return [(y + layer.bias.to(y.dtype) if layer.bias is not None else y).reshape(*x.shape[:-1], -1)
                for layer, y in zip(self.layers, ys)]


@dataclasses.dataclass
class OneLayer:
    """One compressed layer through `KernelProjection` (o_proj, down_proj, the head): a module's call
    without the module machinery on the decode path."""

    projection: KernelProjection

    def __call__(self, x: Tensor) -> Tensor:
        return self.projection(x)[0]


def projection(layers: list[nn.Module], probe: Tensor) -> Projection:
    """The fastest way to run `layers` on one input like `probe` (1, K): through their shared kernel
    when all are compressed layers that picked the same one, else one call each."""
    if len(layers) > 1 and all(is_compressed(layer) for layer in layers):
        kernels = [layer.kernel_state(probe)[0] for layer in layers]
        if all(k is kernels[0] for k in kernels):
            return KernelProjection(layers, kernels[0])
    return SeparateProjection(layers)


def single(layer: nn.Module | None, probe: Tensor) -> Any:
    """`layer` itself, or for a compressed layer whose kernel can bind its arguments, a `OneLayer`."""
    if layer is None or not is_compressed(layer):
        return layer
    kernel = layer.kernel_state(probe)[0]  # chosen by the probe's device and dtype, not its width
    return OneLayer(KernelProjection([layer], kernel)) if hasattr(kernel, "bind") else layer


# --- the plan: the model's modules per layer, and the choices made once -------------------------------


@dataclasses.dataclass
class LayerPlan:
    input_norm: nn.Module
    post_norm: nn.Module
    qkv: Projection  # normed hidden -> [q, k, v], (..., H·D), (..., Hkv·D), (..., Hkv·D)
    q_norm: nn.Module | None  # Qwen3: per-head norms before RoPE
    k_norm: nn.Module | None
    o_proj: Callable[[Tensor], Tensor]  # the module, or `OneLayer` for a compressed one
    gate_up: Projection  # normed hidden -> [gate, up]
    down_proj: Callable[[Tensor], Tensor]
    window: int | None


def identity(x: Tensor) -> Tensor:
    return x


@dataclasses.dataclass
class DecoderPlan:
    spec: DecoderSpec
    embed: nn.Module | None  # None: a later pipeline stage, fed hidden states (Batch.hidden)
    rotary: nn.Module
    layers: list[LayerPlan]
    norm: nn.Module | None  # None (with head): an earlier pipeline stage, returning hidden states
    head: Callable[[Tensor], Tensor] | None
    dtype: torch.dtype
    # Sums the partial outputs of row-parallel projections (o_proj, down_proj) across the processes of
    # a tensor-parallel group: THE one place tensor parallelism adds its all-reduce. Identity on one process.
    reduce: Callable[[Tensor], Tensor] = identity


def build_plan(model: nn.Module, spec: DecoderSpec, first: bool = True, last: bool = True) -> DecoderPlan:
    """Gather the modules the loop calls and decide, once, which projections share a kernel call.
    first / last: this model holds the first / last layers (pipeline stages hold a run of them)."""
    base = model.model
    dtype = float_dtype(model)
    probe = torch.zeros(1, base.embed_tokens.weight.shape[1], dtype=dtype, device=model_device(model))
    d = spec.head_dim
    layers = []
    for layer, window in zip(base.layers, spec.windows):
        attn, mlp = layer.self_attn, layer.mlp
        if spec.fused_qkv:
            qkv = SplitProjection(attn.qkv_proj, [spec.n_heads * d, spec.n_kv_heads * d, spec.n_kv_heads * d])
        else:
            qkv = projection([attn.q_proj, attn.k_proj, attn.v_proj], probe)
        if spec.fused_gate_up:
            half = mlp.gate_up_proj.out_features // 2
            gate_up = SplitProjection(mlp.gate_up_proj, [half, half])
        else:
            gate_up = projection([mlp.gate_proj, mlp.up_proj], probe)
        layers.append(LayerPlan(
            input_norm=layer.input_layernorm, post_norm=layer.post_attention_layernorm, qkv=qkv,
            q_norm=attn.q_norm if spec.qk_norm else None, k_norm=attn.k_norm if spec.qk_norm else None,
            o_proj=single(attn.o_proj, probe), gate_up=gate_up, down_proj=single(mlp.down_proj, probe), window=window))
    return DecoderPlan(spec, base.embed_tokens if first else None, base.rotary_emb, layers,
                       base.norm if last else None, single(model.lm_head, probe) if last else None, dtype)


# --- one step: the loop, and what an op set must provide ----------------------------------------------


@dataclasses.dataclass
class Batch:
    """Tokens ids (B, T) at positions (B, T) of the sequences whose KV-cache block tables are `tables`
    (B, max_blocks), all on the model's device. last_only: logits of each row's last token only; fresh:
    one prompt from position 0 that may attend to its own keys directly; hidden: the tokens' hidden
    states (B, T, C) from the previous pipeline stage (instead of embedding ids); pick: the rows
    whose logits are wanted (a mixed step on the fused ops, `Engine.step`: rows are tokens, several of
    one sequence, and only each sequence's last row gets logits)."""

    ids: Tensor
    positions: Tensor
    tables: Tensor
    last_only: bool = True
    fresh: bool = False
    hidden: Tensor | None = None
    pick: Tensor | None = None


class Ops(Protocol):
    """What one way of running a step provides; tensors' layouts are the op set's own business."""

    def begin(self, plan: DecoderPlan, batch: Batch) -> tuple[Tensor, Any]:
        """The embedded tokens h and whatever the step shares across layers (RoPE tables, masks)."""

    def add_norm(self, h: Tensor, delta: Tensor | None, norm: nn.Module) -> tuple[Tensor, Tensor]:
        """(h + delta, norm(h + delta)): the residual add and the next norm."""

    def project_qkv(self, layer: LayerPlan, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of normed hidden states x (QK-norm applied)."""

    def attend(self, index: int, layer: LayerPlan, q: Tensor, k: Tensor, v: Tensor, ctx: Any) -> Tensor:
        """RoPE on q and k, the KV-cache write of layer `index`, attention; the heads' outputs concatenated."""

    def mlp(self, layer: LayerPlan, x: Tensor) -> Tensor:
        """down(silu(gate(x)) · up(x))."""

    def logits(self, plan: DecoderPlan, h: Tensor, delta: Tensor, ctx: Any) -> Tensor:
        """The final residual add, norm and output head."""

    def hidden(self, h: Tensor, delta: Tensor, ctx: Any) -> Tensor:
        """The residual stream after the last layer, (B, T, C): what a pipeline stage passes on."""


@torch.no_grad()
def forward(plan: DecoderPlan, ops: Ops, batch: Batch) -> Tensor:
    """Run one step (prefill or decode) with op set `ops`: returns logits (B, V) of each row's last
    token, or (B, T, V) when `batch.last_only` is False, or for an earlier pipeline stage (no head)
    the hidden states (B, T, C). The cache is written in place."""
    h, ctx = ops.begin(plan, batch)
    delta = None
    for i, layer in enumerate(plan.layers):
        h, x = ops.add_norm(h, delta, layer.input_norm)
        q, k, v = ops.project_qkv(layer, x)
        attended = ops.attend(i, layer, q, k, v, ctx)
        h, x = ops.add_norm(h, plan.reduce(layer.o_proj(attended)), layer.post_norm)
        delta = plan.reduce(ops.mlp(layer, x))
    if plan.head is None:
        return ops.hidden(h, delta, ctx)
    return ops.logits(plan, h, delta, ctx)
