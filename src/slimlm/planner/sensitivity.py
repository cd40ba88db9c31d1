"""Per-layer sensitivity: for every linear layer of the blocks and every candidate treatment, the KL
divergence of the model's next-token distribution from the original's when only that layer is
treated, and the bytes the treatment stores (the inputs of `allocate.pareto_front`).

Treatments: round-to-nearest int8 / int4 g32 / int4 g128 / int3 g32 / int2 g32 weights (slimlm's
scheme defaults: int8 symmetric, the others asymmetric, float16 scales), magnitude 2:4 and 50%
pruning (per layer), and `keep` (the layer as it is). A treatment is applied as the weights it would
store (fake quantization, masks), so one weight swap per (layer, treatment) and one forward over the
calibration tokens measures it. `from_model` turns a whole compressed copy of the model (a GPTQ
run, say) into a treatment, so calibrated methods are allocated like round-to-nearest ones.

Two ways to measure:

- `direct`: the KL itself, one full forward per (layer, treatment): L·T forwards. Exact, and the
  oracle the other is checked against; affordable for small models only.
- `fisher` (the default): block by block, as the calibrated methods run (`core.calibrate`). The KL
  of a small change δ of block i's output h is, to second order, ½·δᵀ F δ, F the Fisher information
  of the model's output distribution with respect to h (Amari 1998; its diagonal at block outputs is
  BRECQ's, Li et al., arXiv 2102.05426, §3.2). F's diagonal is estimated once, from the gradients of
  log p(y) for next tokens y sampled from the model itself (`fisher_samples` backward passes per
  window); then every candidate of a block costs one forward of that block only, on the block's
  captured inputs: Σ_i (layers_i·T) block forwards instead of L·T whole-model ones. The
  approximation drops the off-diagonal terms of F and everything past second order; on
  stories260K it ranks the (layer, treatment) pairs as the direct method does (Spearman in the
  README), and `direct` remains for when the planner's KLs must be exact.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from slimlm.core.config import Config, check, field
from slimlm.core.layers import find_blocks
from slimlm.planner.allocate import Option

@dataclasses.dataclass(frozen=True)
class Treatment:
    """What a treatment stores for a layer: `apply(layer name, weight (N, K))` -> the weight it holds,
    `stored(layer name, N, K, bytes per float element)` -> its bytes."""

    apply: Callable[[str, Tensor], Tensor]
    stored: Callable[[str, int, int, int], int]


def _quantized(bits: int, group: int | None, symmetric: bool) -> Treatment:
    from slimlm.quant import primitives as P
    from slimlm.quant.scheme import QuantScheme

    scheme = QuantScheme(bits=bits, group_size=group, symmetric=symmetric)

    def stored(name: str, n: int, k: int, element: int) -> int:
        groups = math.ceil(k / P.group_size_for(k, scheme))
        return math.ceil(n * P.padded_k(k, scheme) * bits / 8) + n * groups * (2 + (0 if symmetric else 1))

    return Treatment(lambda name, w: P.fake_quantize(w.float(), scheme).to(w.dtype), stored)


def _pruned(pattern: str) -> Treatment:
    from slimlm.pruning.masks import nm_mask, topk_mask

    def apply(name: str, w: Tensor) -> Tensor:
        scores = w.float().abs()
        return w * (nm_mask(scores, 2, 4) if pattern == "2:4" else topk_mask(scores, 0.5))

    # slimlm's bitmask storage: the kept values, and one bit per weight
    return Treatment(apply, lambda name, n, k, element: n * k // 2 * element + math.ceil(n * k / 8))


def treatments() -> dict[str, Treatment]:
    return {
        "keep": Treatment(lambda name, w: w, lambda name, n, k, element: n * k * element),
        "int8": _quantized(8, None, True),
        "int4 g128": _quantized(4, 128, False),
        "int4 g32": _quantized(4, 32, False),
        "int3 g32": _quantized(3, 32, False),
        "int2 g32": _quantized(2, 32, False),
        "2:4": _pruned("2:4"),
        "50%": _pruned("50%"),
    }


def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The linear layers of the blocks, float or compressed, by module name (what recipes' `include` take)."""
    from slimlm.core.layers import is_compressed

    prefix, blocks = find_blocks(model)
    return {f"{prefix}.{i}.{n}": m for i, block in enumerate(blocks) for n, m in block.named_modules()
            if isinstance(m, nn.Linear) or is_compressed(m)}


def from_model(compressed: nn.Module) -> Treatment:
    """A treatment read off a whole compressed copy of the model (one GPTQ or AWQ run, say): a layer
    treated takes that copy's layer, dequantized, and is charged its stored bytes. So calibrated
    methods, whose codes depend on the data, enter the allocation like any other treatment."""
    from slimlm.core.layers import is_compressed

    layers = block_linears(compressed)

    def apply(name: str, w: Tensor) -> Tensor:
        m = layers[name]
        return (m.dequantize(torch.float32) if is_compressed(m) else m.weight.data.float()).to(w.dtype)

    def stored(name: str, n: int, k: int, element: int) -> int:
        m = layers[name]
        if not is_compressed(m):
            return n * k * element
        bias = getattr(m, "bias", None)
        return m.storage_bytes() - (bias.numel() * bias.element_size() if bias is not None else 0)

    return Treatment(apply, stored)


@dataclasses.dataclass
class Sensitivity:
    """KL (nats per token) and bytes of every (layer, treatment)."""

    layers: list[str]
    treatments: list[str]
    kl: list[list[float]]  # [layer][treatment]
    bytes: list[list[int]]

    def options(self) -> list[list[Option]]:
        return [[Option(t, self.bytes[i][j], self.kl[i][j]) for j, t in enumerate(self.treatments)
                 if not math.isnan(self.kl[i][j])] for i in range(len(self.layers))]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _kl(ref_logp: Tensor, logits: Tensor) -> float:
    logp = torch.log_softmax(logits.float(), -1)
    return float((ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp(min=0).mean())


def _fingerprint(layers: dict[str, nn.Module], tokens: Tensor, chosen: list[str]) -> str:
    """What a saved partial measurement must match to be resumed: the tokens, the treatments, and
    each layer's name, shape and weights (a checksum)."""
    import hashlib

    h = hashlib.sha256()
    h.update(tokens.to(torch.int64).contiguous().numpy().tobytes())
    h.update("|".join(chosen).encode())
    for name, m in layers.items():
        w = m.weight.detach()
        h.update(f"{name}:{tuple(w.shape)}:{float(w.double().sum()):.17g}:{float(w.double().abs().sum()):.17g}".encode())
    return h.hexdigest()


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(state) + "\n")
    tmp.replace(path)  # a reader never sees a half-written file


METHODS = ("fisher", "direct")


@dataclasses.dataclass(frozen=True)
class SensitivityFields:
    """How the per-layer sensitivity is measured (shared by `slimlm sensitivity` and `slimlm plan`)."""

    calib: str = field("demo", "calibration text (.txt, .jsonl, 'demo'; FILE@0:200 for a range of documents)")
    windows: int = field(8, "calibration windows the per-layer sensitivity is measured on")
    seq_len: int = field(256, "tokens per window")
    method: str = field("fisher", "sensitivity measurement: fisher (block by block, second order; fast) or direct "
                                  "(one whole forward per layer and treatment; exact, slow)")
    fisher_samples: int = field(4, "sampled next tokens per window for the fisher method's Fisher information")

    def __post_init__(self) -> None:
        check(self.method in METHODS, f"method '{self.method}' is not one of {', '.join(METHODS)}")
        for name in ("windows", "seq_len", "fisher_samples"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"{name} {value!r} must be at least 1")

    def windows_of(self, tokenizer) -> tuple[Tensor, Tensor]:
        """(all calibration token ids (T,), the first `windows` windows (windows, seq_len))."""
        from slimlm.core.data import load_tokens
        from slimlm.core.errors import SlimError

        ids = load_tokens(self.calib, tokenizer)
        if ids.numel() < self.windows * self.seq_len:
            raise SlimError(f"the calibration text has {ids.numel()} tokens, fewer than --windows {self.windows} x "
                            f"--seq-len {self.seq_len}; give more text or lower them")
        return ids, ids[: self.windows * self.seq_len].view(self.windows, self.seq_len)


@dataclasses.dataclass(frozen=True)
class SensitivityConfig(SensitivityFields, Config):
    """What `slimlm sensitivity` measures."""

    name = "sensitivity"
    treatments: tuple[str, ...] = field((), "treatments to measure (default all): keep, int8, int4 g128, int4 g32, "
                                            "int3 g32, int2 g32, 2:4, 50%; repeat the flag for several")

    def __post_init__(self) -> None:
        SensitivityFields.__post_init__(self)
        object.__setattr__(self, "treatments", tuple(self.treatments))
        unknown = [t for t in self.treatments if t not in treatments()]
        check(not unknown, f"unknown treatment(s) {', '.join(unknown)}; the built-in ones are {', '.join(treatments())}")


@torch.no_grad()
def _fisher_diagonals(model: nn.Module, blocks: nn.ModuleList, tokens: Tensor, samples: int, seed: int = 0) -> list[Tensor]:
    """Per block, the diagonal of the Fisher information of the model's next-token distributions
    with respect to the block's output, per window, position and channel: (n, T, C), the mean over
    `samples` draws y ~ p(·|x) of (∂ Σ_t log p(y_t) / ∂h)²."""
    from slimlm.core.layers import block_output

    outputs: list[Tensor] = []

    def keep(module, args, output):
        h = block_output(output)
        if torch.is_grad_enabled():
            h.retain_grad()
            outputs.append(h)

    def start_graph(module, args, output):  # gradients flow from the embeddings on; no weight needs one
        return output.detach().requires_grad_(True) if torch.is_grad_enabled() else output

    handles = [b.register_forward_hook(keep) for b in blocks]
    handles.append(model.get_input_embeddings().register_forward_hook(start_graph))
    fisher = [torch.zeros(tokens.shape[0], tokens.shape[1], 0) for _ in blocks]
    gen = torch.Generator().manual_seed(seed)
    try:
        for w, row in enumerate(tokens):
            for s in range(samples):
                outputs.clear()
                with torch.enable_grad():
                    logp = torch.log_softmax(model(row[None], use_cache=False).logits.float(), -1)[0]
                    y = torch.multinomial(logp.detach().exp(), 1, generator=gen)
                    logp.gather(-1, y).sum().backward()
                for i, h in enumerate(outputs):
                    g2 = h.grad[0].float() ** 2 / samples
                    if fisher[i].shape[-1] == 0:
                        fisher[i] = torch.zeros(tokens.shape[0], tokens.shape[1], g2.shape[-1])
                    fisher[i][w] += g2
    finally:
        for h in handles:
            h.remove()
        outputs.clear()
    return fisher


def measure_sensitivity(model: nn.Module, tokens: Tensor, names: list[str] | None = None,
                        on_layer: Callable[[int, int], None] | None = None,
                        extra: dict[str, Treatment] | None = None, state: str | os.PathLike | None = None,
                        method: str = "fisher", fisher_samples: int = 4) -> Sensitivity:
    """Sensitivity of `model`'s block linear layers on calibration `tokens` (n, T). The model is
    restored after each measurement. names: built-in treatments (default all); extra: more by name
    (e.g. {"gptq int4 g32": from_model(a GPTQ-quantized copy)}). method: `fisher` (block by block,
    second order) or `direct` (one whole forward per layer and treatment; see the module docstring).
    on_layer(done, total): progress. state: a JSON file written after every layer; a run interrupted
    and started again with the same model, tokens, treatments and method resumes from it (a
    different one starts afresh)."""
    from slimlm.core.errors import SlimError

    if method not in METHODS:
        raise SlimError(f"sensitivity method '{method}' is not one of {', '.join(METHODS)}")
    layers = {k: m for k, m in block_linears(model).items() if isinstance(m, nn.Linear)}
    table = {**treatments(), **(extra or {})}
    chosen = (names or list(treatments())) + list(extra or {})
    unknown = [t for t in chosen if t not in table]
    if unknown:
        raise SlimError(f"unknown treatment(s) {', '.join(unknown)}; the built-in ones are {', '.join(treatments())}")
    saved: dict = {}
    key = ""
    if state is not None:
        state = Path(state).expanduser()
        key = _fingerprint(layers, tokens, chosen + [f"method={method}:{fisher_samples if method == 'fisher' else ''}"])
        if state.is_file():
            try:
                previous = json.loads(state.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                previous = {}
            if previous.get("fingerprint") == key:
                saved = previous.get("rows", {})
    rows: dict[str, dict] = {}

    def measure_row(name: str, layer: nn.Module, measure: Callable[[], float]) -> None:
        w = layer.weight.data
        n, k = w.shape
        row_kl, row_bytes = [], []
        for t in chosen:
            row_bytes.append(table[t].stored(name, n, k, w.element_size()))
            if t in ("2:4",) and k % 4:
                row_kl.append(float("nan"))
                continue
            if t == "keep":
                row_kl.append(0.0)
                continue
            layer.weight.data = table[t].apply(name, w)
            try:
                row_kl.append(measure())
            finally:
                layer.weight.data = w
        rows[name] = {"kl": row_kl, "bytes": row_bytes}

    def finished(name: str) -> None:
        if state is not None and name not in saved:
            _save_state(state, {"fingerprint": key, "treatments": chosen, "rows": rows})
        if on_layer:
            on_layer(len(rows), len(layers))

    with torch.no_grad():
        if method == "direct":
            ref = [torch.log_softmax(model(row[None]).logits.float(), -1) for row in tokens]

            def kl_now() -> float:
                return sum(_kl(r, model(row[None]).logits) for r, row in zip(ref, tokens)) / len(tokens)

            for name, layer in layers.items():
                if name in saved:  # measured by an earlier, interrupted run
                    rows[name] = saved[name]
                else:
                    measure_row(name, layer, kl_now)
                finished(name)
        else:
            _blockwise(model, tokens, layers, saved, rows, measure_row, finished, fisher_samples)
    kl = [[float(v) for v in rows[name]["kl"]] for name in layers]
    sizes = [list(rows[name]["bytes"]) for name in layers]
    return Sensitivity(list(layers), chosen, kl, sizes)


def _blockwise(model, tokens, layers, saved, rows, measure_row, finished, fisher_samples: int) -> None:
    """The `fisher` method: per block, ½·Σ F⊙δ² of the block output for each candidate (module docstring)."""
    from slimlm.core.calibrate import capture_block_inputs
    from slimlm.core.layers import block_output

    prefix, blocks = find_blocks(model)
    todo = [name for name in layers if name not in saved]
    fisher = _fisher_diagonals(model, blocks, tokens, fisher_samples) if todo else None
    inputs = capture_block_inputs(model, blocks[0], tokens, batch_size=1)
    positions = tokens.shape[0] * tokens.shape[1]
    for index, block in enumerate(blocks):
        ref = [block_output(block(*args, **kwargs)) for args, kwargs in inputs]

        def predicted_kl() -> float:
            total = 0.0
            for w, (args, kwargs) in enumerate(inputs):
                delta = block_output(block(*args, **kwargs)).float() - ref[w].float()
                total += 0.5 * float((fisher[index][w] * delta[0] ** 2).sum())
            return total / positions

        for name, layer in layers.items():
            if not name.startswith(f"{prefix}.{index}."):
                continue
            if name in saved:
                rows[name] = saved[name]
            else:
                measure_row(name, layer, predicted_kl)
            finished(name)
        inputs = [((ref[w],) + tuple(args[1:]), kwargs) for w, (args, kwargs) in enumerate(inputs)]
