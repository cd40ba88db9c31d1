"""GGUF export for llama.cpp, Ollama and LM Studio, written with `gguf`, llama.cpp's own writer.

What it writes (`export_gguf`):
- the Llama family as llama.cpp's `llama` (Llama, Mistral) and `qwen2` architectures, with the
  metadata llama.cpp reads: context length, sizes, head counts and head width, norm epsilon, rope
  base and scaling (linear, YaRN; Llama 3's frequency factors as the `rope_freqs` tensor), sliding
  window, and the vocabulary (`gguf_vocab`), special tokens and chat template;
- every int layer that a simple GGML type holds exactly as that type, codes copied (`gguf_blocks`):
  symmetric int8 → Q8_0, symmetric int4 → Q4_0, asymmetric int4 → Q4_1, for any group width that is
  a multiple of 32 (per-channel included). GPTQ and AWQ results reach llama.cpp with their codes
  intact; the only change is a scale (or min) rounded to float16, measured and reported;
- float matrices in their own precision (or `float_type`), 1-D tensors (norms, biases) as F32;
- q/k rows permuted to llama.cpp's rotary layout for `llama` (codes, scales and zeros alike);
- anything a simple type cannot hold (int3/int2, log, fp8, W8A8, asymmetric int8, groups that are
  not a multiple of 32, rows that are not) only when `requantize` names a type for it, with the KL
  divergence that costs measured on the built-in text; otherwise the export is refused naming the
  layer and why. Rows of a length no 32-block type fits are written as F16 (said in the log).
The file is written under a temporary name and renamed when complete, so no partial GGUF is ever
left at the output path; tensors are produced and written one at a time (peak memory: the loaded
model plus one tensor).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from slimlm.core.errors import SlimError
from slimlm.core.files import atomic_file
from slimlm.exporters import gguf_blocks as B
from slimlm.exporters.gguf_metadata import ARCHITECTURES, _gguf, _metadata, _rope_freqs, _vocab, check_exportable

log = logging.getLogger(__name__)

FLOAT_TYPES = ("f32", "f16", "bf16")
TYPES = FLOAT_TYPES + tuple(B.LOSSLESS)


@dataclass
class GGUFExport:
    """What an export wrote and what it cost."""

    path: Path
    bytes: int = 0
    types: dict[str, int] = field(default_factory=dict)  # GGML type -> tensors
    copied: list[str] = field(default_factory=list)  # layers whose codes were copied exactly
    requantized: dict[str, str] = field(default_factory=dict)  # layer -> type it was re-quantized to
    scale_rounding: float = 0.0  # largest |w_gguf - w_slimlm| / max|w_slimlm| over copied layers
    kl: float | None = None  # mean KL(slimlm model || exported weights) per token, when layers were re-quantized

    def summary(self) -> str:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.types.items()))
        line = (f"wrote {self.path} ({self.bytes / 2**20:.2f} MiB; tensors: {types}); {len(self.copied)} quantized "
                f"layers copied exactly, largest error from rounding scales to float16: {self.scale_rounding:.2e}")
        if self.requantized:
            kinds = sorted(set(self.requantized.values()))
            line += (f"; {len(self.requantized)} layers re-quantized to {'/'.join(kinds)}"
                     + (f" (KL {self.kl:.4f} nats/token against the slimlm model)" if self.kl is not None else ""))
        return line


@dataclass
class _Entry:
    """One tensor to write: GGUF name, GGML type name, logical shape (rows, cols) and its bytes."""

    name: str
    kind: str
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]


def lossless_kind(layer: nn.Module) -> tuple[str | None, str]:
    """The GGML type that holds `layer`'s codes exactly, or None and why not."""
    from slimlm.quant import primitives as P
    from slimlm.quant.linear import QuantizedLinear

    if not isinstance(layer, QuantizedLinear):
        return None, f"{type(layer).__name__} has no GGUF type"
    s = layer.scheme
    if s.format != "int":
        return None, f"{s.format} codes have no GGUF type"
    kind = next((k for k, v in B.LOSSLESS.items() if v == (s.bits, bool(s.symmetric))), None)
    if kind is None:
        return None, f"{'symmetric' if s.symmetric else 'asymmetric'} int{s.bits} has no simple GGUF type"
    k, g = layer.in_features, P.group_size_for(layer.in_features, s)
    if k % B.BLOCK:
        return None, f"its {k} input columns are not a multiple of GGUF's 32-weight blocks"
    if g % B.BLOCK:
        return None, f"its groups of {g} are not a multiple of GGUF's 32-weight blocks"
    return kind, ""


def _float_kind(dtype: torch.dtype, float_type: str) -> str:
    if float_type != "auto":
        return float_type
    return {torch.float16: "f16", torch.bfloat16: "bf16"}.get(dtype, "f32")


def _float_bytes(w: Tensor, kind: str) -> np.ndarray:
    if kind == "bf16":
        return w.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
    return w.to(torch.float16 if kind == "f16" else torch.float32).contiguous().numpy()


def _nbytes(kind: str, shape: tuple[int, ...]) -> int:
    n = math.prod(shape)
    if kind in B.BYTES_PER_BLOCK:
        return n // B.BLOCK * B.BYTES_PER_BLOCK[kind]
    return n * (4 if kind == "f32" else 2)


def export_gguf(
    model: nn.Module, tokenizer_folder: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
    requantize: str | None = None, float_type: str = "auto", name: str | None = None,
    kl_tokens: Callable[[], Tensor | None] | None = None,
) -> GGUFExport:
    """Write `model` (loaded by slimlm; its tokenizer files in `tokenizer_folder`) as one GGUF file.

    requantize: the GGML type (f16, bf16, f32, q8_0, q4_0, q4_1) for layers no type holds exactly;
    None refuses such a model. float_type: float matrices' type ('auto': their own precision).
    kl_tokens: returns the token ids (n, T) on which the KL of a re-quantization is measured (called only
    when a layer was re-quantized; default: none measured)."""
    gguf = _gguf()
    arch = check_exportable(model)
    if requantize is not None and requantize not in TYPES:
        raise SlimError(f"unknown GGUF type '{requantize}'; use one of {', '.join(TYPES)}")
    if float_type not in ("auto",) + FLOAT_TYPES:
        raise SlimError(f"unknown float type '{float_type}'; use auto, {', '.join(FLOAT_TYPES)}")
    result = GGUFExport(Path(out))
    replaced: dict[str, Tensor] = {}  # re-quantized layer -> the weight its GGUF tensor holds (HF row order)
    entries = _plan(model, arch, requantize, float_type, result, replaced)
    matrices = [e.kind for e in entries if len(e.shape) == 2]
    main = max(set(matrices), key=matrices.count) if matrices else "f32"
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[main]
    with atomic_file(out, overwrite) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        _metadata(w, model, arch, name or Path(out).stem)
        w.add_file_type(int(file_type))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _vocab(w, Path(tokenizer_folder), int(model.config.vocab_size))
        for e in entries:
            # numpy's shape order: (rows, columns); block types and bf16 are passed as their bytes
            raw_dtype = gguf.GGMLQuantizationType[e.kind.upper()]
            if e.kind in ("f32", "f16"):
                shape, dtype = e.shape, np.dtype(np.float16 if e.kind == "f16" else np.float32)
            else:
                shape, dtype = gguf.quant_shape_to_byte_shape(e.shape, raw_dtype), np.dtype(np.uint8)
            w.add_tensor_info(e.name, shape, dtype, _nbytes(e.kind, e.shape), raw_dtype=raw_dtype)
            result.types[e.kind.upper()] = result.types.get(e.kind.upper(), 0) + 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for e in entries:
            w.write_tensor_data(e.make())
        w.close()
    result.bytes = Path(out).stat().st_size
    tokens = kl_tokens() if replaced and kl_tokens is not None else None
    if tokens is not None:
        result.kl = requantization_kl(model, replaced, tokens)
    return result


def _plan(model: nn.Module, arch: str, requantize: str | None, float_type: str, result: GGUFExport,
          replaced: dict[str, Tensor]) -> list[_Entry]:
    """The tensors to write, in order, each with the function that makes its bytes."""
    gguf = _gguf()
    from slimlm.quant.linear import CompressedLinear

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], int(config.num_hidden_layers))
    permute = ARCHITECTURES[config.model_type][1]
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    compressed = {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
    entries: list[_Entry] = []

    def gguf_name(hf: str) -> str:
        mapped = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise SlimError(f"tensor '{hf}' has no place in llama.cpp's {arch} layout; export with --format hf")
        return mapped

    def rows_heads(layer_name: str) -> int | None:
        if not permute:
            return None
        return heads if layer_name.endswith("q_proj") else kv_heads if layer_name.endswith("k_proj") else None

    def order(t: Tensor, h: int | None) -> Tensor:
        return B.permute_rows(t, h) if h else t

    for layer_name, layer in compressed.items():
        h = rows_heads(layer_name)
        target = gguf_name(layer_name + ".weight")
        kind, why = lossless_kind(layer)
        n, k = layer.out_features, layer.in_features
        if kind is not None:
            result.copied.append(layer_name)
            result.scale_rounding = max(result.scale_rounding, _rounding_error(layer, kind))
            entries.append(_Entry(target, kind, (n, k), _copy_codes(layer, kind, h)))
        elif requantize is None:
            raise SlimError(f"layer '{layer_name}' cannot be written exactly in GGUF: {why}; pass --type "
                            f"(q8_0, q4_0, q4_1, f16, bf16 or f32) to re-quantize such layers, or export with --format hf")
        else:
            target_kind = requantize if (requantize in FLOAT_TYPES or k % B.BLOCK == 0) else "f16"
            if target_kind != requantize:
                log.info("layer %s: %d input columns are not a multiple of 32, so it is written as F16", layer_name, k)
            weight = layer.dequantize(torch.float32)
            values, make = _requantize(weight, target_kind, h)
            replaced[layer_name] = values
            result.requantized[layer_name] = target_kind
            entries.append(_Entry(target, target_kind, (n, k), make))
        bias = getattr(layer, "bias", None)
        if bias is not None:
            entries.append(_float_entry(gguf_name(layer_name + ".bias"), order(bias.detach(), h), "f32"))
    for hf, p in model.named_parameters():
        owner = hf.rsplit(".", 1)[0]
        if owner in compressed:
            continue
        t = p.detach()
        if t.dim() == 2 and type(model.get_submodule(owner)).__name__ == "Conv1D":
            t = t.t()  # GPT-2's Conv1D stores (in, out); GGUF wants (out, in) like nn.Linear
        h = rows_heads(owner)
        if t.dim() == 1:
            entries.append(_float_entry(gguf_name(hf), order(t, h), "f32"))
        else:
            entries.append(_float_entry(gguf_name(hf), order(t, h), _float_kind(t.dtype, float_type)))
    freqs = _rope_freqs(config)
    if freqs is not None:
        entries.append(_float_entry(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", freqs, "f32"))
    return entries


def _float_entry(name: str, t: Tensor, kind: str) -> _Entry:
    return _Entry(name, kind, tuple(t.shape), lambda: _float_bytes(t, kind))


def _copy_codes(layer: nn.Module, kind: str, heads: int | None) -> Callable[[], np.ndarray]:
    def make() -> np.ndarray:
        k = layer.in_features
        codes = layer.codes()[:, :k]  # (N, K) uint8
        scale, zero = B.block_params(layer.scale, layer.zero_points(), k)  # (N, K/32)
        if heads:
            codes, scale, zero = (B.permute_rows(t, heads) for t in (codes, scale, zero))
        return B.pack_blocks(kind, codes.contiguous(), scale, zero).numpy()

    return make


def _rounding_error(layer: nn.Module, kind: str, rows: int = 1024) -> float:
    """Largest change a layer's weights see from its scales (and mins) rounded to float16, relative to
    the layer's largest weight (computed `rows` rows at a time, so a large head needs little memory)."""
    if layer.scale.dtype == torch.float16 and kind != "q4_1":
        return 0.0  # the scale is copied as it is, and so is every code: nothing changes
    from slimlm.quant import primitives as P

    k, worst, top = layer.in_features, 0.0, 0.0
    codes = layer.codes()
    for a in range(0, layer.out_features, rows):
        part = slice(a, a + rows)
        zero = layer.zero_points()[part]  # (rows, G) int32
        exact = P.dequantize(codes[part], layer.scale[part], zero, k)  # (rows, K) float32
        scale, zero_b = B.block_params(layer.scale[part], zero, k)
        written = B.block_values(kind, codes[part, :k].contiguous(), scale, zero_b)
        worst = max(worst, float((written - exact).abs().max()))
        top = max(top, float(exact.abs().max()))
    return worst / max(top, 1e-30)


def _requantize(weight: Tensor, kind: str, heads: int | None) -> tuple[Tensor, Callable[[], np.ndarray]]:
    """The weight `kind` holds for `weight` (N, K) float32, and the function making its GGUF bytes,
    through gguf's own quantizer (llama.cpp's reference rounding)."""
    gguf = _gguf()
    if kind in FLOAT_TYPES:
        values = weight.to({"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[kind]).float()
        return values, lambda: _float_bytes(B.permute_rows(values, heads) if heads else values, kind)
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    data = gguf.quants.quantize((B.permute_rows(weight, heads) if heads else weight).numpy(), qtype)  # (N, bytes)
    held = torch.from_numpy(gguf.quants.dequantize(data, qtype).copy())
    if heads:  # back to Hugging Face's row order, for the KL measurement
        n = held.shape[0]
        held = held.reshape(heads, held.shape[0] // heads // 2, 2, -1).transpose(1, 2).reshape(n, -1)
    return held, lambda: data


def requantization_kl(model: nn.Module, replaced: dict[str, Tensor], tokens: Tensor) -> float:
    """Mean per-token KL(model || model with `replaced` layers' weights swapped in) on `tokens` (n, T)."""
    from slimlm.core.layers import model_device
    from slimlm.eval.metrics import kl_divergence

    device = model_device(model)
    swapped: dict[str, nn.Module] = {}
    kls = []
    with torch.no_grad():
        reference = [model(row[None].to(device)).logits.float() for row in tokens]
        for name, w in replaced.items():
            layer = model.get_submodule(name)
            dense = nn.Linear(w.shape[1], w.shape[0], bias=getattr(layer, "bias", None) is not None, device=device)
            dense.weight.data = w.to(device, layer.compute_dtype if hasattr(layer, "compute_dtype") else torch.float32)
            if dense.bias is not None:
                dense.bias.data = layer.bias.data.to(dense.weight.dtype)
            swapped[name] = layer
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense)
        try:
            for row, ref in zip(tokens, reference):
                kls.append(kl_divergence(ref[0], model(row[None].to(device)).logits.float()[0]).mean())
        finally:
            for name, layer in swapped.items():
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, layer)
    return float(torch.stack(kls).mean())
