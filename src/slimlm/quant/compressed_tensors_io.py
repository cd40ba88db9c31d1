"""Reading and writing the `compressed-tensors` "pack-quantized" checkpoint format (the format of
vLLM and llm-compressor, loaded by plain transformers when the `compressed-tensors` package is
installed), for int4/int8 weight-only QuantizedLinear layers.

Per quantized nn.Linear `<m>` of weight (N, K), with G = K / group_size groups (1 per channel):
  <m>.weight_packed      int32 (N, ceil(K·b/32))   codes q in [0, 2^b − 1], 32/b per word along K,
                                                   element c at bit b·(c mod 32/b) (LSB first)
  <m>.weight_scale       (N, G), in the model's float dtype (transformers casts it to that anyway)
  <m>.weight_zero_point  int32 (ceil(N·b/32), G)   asymmetric only: unsigned zero points packed
                                                   the same way along N
  <m>.weight_shape       int64 (2,) = (N, K)
and w = (q − z)·s, z = 2^(b−1) when symmetric: exactly slimlm's codes and parameters, so converting
either way is lossless. config.json gets a `quantization_config` with `quant_method:
compressed-tensors`, one config group per scheme and the unquantized layers in `ignore`.
Asymmetric folders also carry `"dequantize": true`: compressed-tensors 0.20 cannot build packed zero
points at load time, so transformers is told to dequantize while loading (same logits, dense memory);
that path handles one config group only, so mixed schemes are exported when all are symmetric.

What the format cannot express (GPT-2 Conv1D layers, groups that do not divide K, int3/int2,
logarithmic/fp8 codes, W8A8 with smoothing, scales that would lose precision in the model dtype)
is saved in slimlm's own format instead (`export_reason` says why).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from slimlm.core.errors import SlimError
from slimlm.core.files import read_safetensors
from slimlm.core.layers import float_dtype, is_compressed, is_linear, output_head_name, replace_module_
from slimlm.core.model_io import assign_state_, params_on_meta
from slimlm.quant import primitives as P
from slimlm.quant.linear import QuantizedLinear
from slimlm.quant.scheme import SCALE_DTYPES, QuantScheme

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
EXPORT_BITS = (4, 8)


def pack_int32(codes: Tensor, bits: int) -> Tensor:
    """Codes (R, C) in [0, 2^bits − 1] -> int32 words (R, ceil(C·bits/32)), LSB first along C."""
    per = 32 // bits
    r, c = codes.shape
    x = torch.nn.functional.pad(codes.to(torch.int64), (0, (-c) % per)).view(r, -1, per)  # (R, W, per)
    words = (x << (torch.arange(per, dtype=torch.int64) * bits)).sum(-1)  # (R, W) in [0, 2^32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int32(words: Tensor, bits: int, c: int) -> Tensor:
    """Inverse of `pack_int32`: codes (R, c) uint8."""
    per = 32 // bits
    x = words.to(torch.int64) & 0xFFFFFFFF  # (R, W)
    codes = (x[..., None] >> (torch.arange(per, dtype=torch.int64) * bits)) & (2**bits - 1)  # (R, W, per)
    return codes.view(words.shape[0], -1)[:, :c].to(torch.uint8)


def _weights_block(scheme: QuantScheme, k: int) -> dict[str, Any]:
    per_channel = P.group_size_for(k, scheme) == k
    return {"num_bits": scheme.bits, "type": "int", "symmetric": scheme.symmetric, "dynamic": False,
            "strategy": "channel" if per_channel else "group", "group_size": None if per_channel else scheme.group_size}


def _linear_slots(model: nn.Module) -> dict[str, bool]:
    """name -> whether the architecture has an nn.Linear there (not a Conv1D), from a meta skeleton."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    return {name: isinstance(m, nn.Linear) for name, m in skeleton.named_modules()}


def export_reason(model: nn.Module) -> str | None:
    """Why the model cannot be saved as compressed-tensors, or None if it can."""
    dtype = float_dtype(model)
    quantized = [(n, m) for n, m in model.named_modules() if is_compressed(m)]
    if not quantized:
        return "it has no quantized layers"
    slots = None
    for name, m in quantized:
        if not isinstance(m, QuantizedLinear):
            return f"layer {name} is {m.scheme.label()}, which compressed-tensors does not express as weight-only"
        s = m.scheme
        if getattr(s, "format", "int") != "int" or s.bits not in EXPORT_BITS:
            return f"layer {name} is {s.label()}; compressed-tensors export covers int4 and int8"
        if P.padded_k(m.in_features, s) != m.in_features:
            return f"layer {name}: group size {s.group_size} does not divide its {m.in_features} inputs"
        if not torch.equal(m.scale.to(dtype).to(m.scale.dtype), m.scale):
            return f"layer {name}: {s.scale_dtype} scales would lose precision as {str(dtype)[6:]}"
        slots = slots or _linear_slots(model)
        if not slots.get(name, False):
            return f"layer {name} is not an nn.Linear in this architecture (e.g. GPT-2 Conv1D)"
    schemes = {(m.scheme.bits, P.group_size_for(m.in_features, m.scheme), m.scheme.symmetric) for _, m in quantized}
    if len(schemes) > 1 and any(not sym for _, _, sym in schemes):
        # transformers 5.24 + compressed-tensors 0.20 dequantize every group with one group's
        # parameters when zero points are present, so such a folder would not load there
        head = output_head_name(model)
        hint = (" (here the int8 output head beside asymmetric layers: quantize with --head float, or --symmetric)"
                if any(n == head for n, _ in quantized) else "")
        return f"it mixes schemes with asymmetric ones, which transformers cannot load from compressed-tensors yet{hint}"
    return None


def to_compressed_tensors(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Any]:
    """Rewrite `state` (the model's deduplicated state dict) in place into compressed-tensors
    tensors and return the config.json `quantization_config`. Call `export_reason` first."""
    dtype = float_dtype(model)
    groups: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if not isinstance(m, QuantizedLinear):
            continue
        for key in ("qweight", "scale", "zero"):
            state.pop(f"{name}.{key}", None)
        s = m.scheme
        state[f"{name}.weight_packed"] = pack_int32(m.codes(), s.bits)
        state[f"{name}.weight_scale"] = m.scale.to(dtype).contiguous()
        state[f"{name}.weight_shape"] = torch.tensor([m.out_features, m.in_features], dtype=torch.int64)
        if not s.symmetric:
            state[f"{name}.weight_zero_point"] = pack_int32(m.zero.to(torch.int64).t(), s.bits).t().contiguous()
        weights = _weights_block(s, m.in_features)
        key = repr(sorted(weights.items()))
        groups.setdefault(key, {"targets": [], "weights": weights})["targets"].append(name)
    quantized = {n for g in groups.values() for n in g["targets"]}
    head = output_head_name(model)
    ignore = [n for n, m in model.named_modules() if n and is_linear(m) and n not in quantized]
    if head and head not in ignore and head not in quantized:
        ignore.append(head)
    config_groups = {}
    for i, group in enumerate(groups.values()):
        targets = ["Linear"] if len(groups) == 1 else [f"re:^{re.escape(n)}$" for n in group["targets"]]
        config_groups[f"group_{i}"] = {"targets": targets, "weights": group["weights"], "format": FORMAT,
                                       "input_activations": None, "output_activations": None}
    block = {"quant_method": QUANT_METHOD, "format": FORMAT, "quantization_status": "compressed",
             "config_groups": config_groups, "ignore": ignore, "kv_cache_scheme": None, "sparsity_config": {}}
    if any(not g["weights"]["symmetric"] for g in groups.values()):
        block["dequantize"] = True
    return block


def _matches(name: str, module: nn.Module, targets: list[str]) -> bool:
    for t in targets:
        if t.startswith("re:"):
            if re.match(t[3:], name):
                return True
        elif t == name or t == type(module).__name__:
            return True
    return False


def _scheme_for(name: str, module: nn.Module, qblock: dict[str, Any]) -> tuple[dict, QuantScheme] | None:
    if _matches(name, module, qblock.get("ignore") or []):
        return None
    for group in (qblock.get("config_groups") or {}).values():
        if not _matches(name, module, group.get("targets") or []):
            continue
        w = group.get("weights") or {}
        if group.get("input_activations") or w.get("type", "int") != "int" or w.get("strategy") not in ("group", "channel") \
                or w.get("num_bits") not in (2, 4, 8) or w.get("dynamic"):
            raise SlimError(f"compressed-tensors scheme of layer {name} ({w}, activations "
                            f"{group.get('input_activations')}) is not supported by slimlm.load; load it with transformers")
        group_size = w.get("group_size") if w.get("strategy") == "group" else None
        return w, QuantScheme(bits=w["num_bits"], group_size=group_size, symmetric=bool(w.get("symmetric", True)),
                              scale_dtype="float32")
    return None


def check_ct_format(path, qblock: dict[str, Any]) -> None:
    if qblock.get("format") not in (FORMAT, None) or any(
            g.get("format", FORMAT) != FORMAT for g in (qblock.get("config_groups") or {}).values()):
        raise SlimError(f"{path} uses compressed-tensors format '{qblock.get('format')}'; slimlm.load reads "
                        f"'{FORMAT}' (int4/int8 weight-only); load it with transformers")


def build_ct_layer(path, name: str, module: nn.Module, qblock: dict[str, Any], read, dtype: torch.dtype):
    """The QuantizedLinear of layer `name` (its float skeleton `module`, on meta) from a pack-quantized
    compressed-tensors checkpoint, its tensors taken with read(key) -> Tensor or None; None when the
    checkpoint does not quantize this layer."""
    check_ct_format(path, qblock)
    packed = read(f"{name}.weight_packed")
    if not isinstance(module, nn.Linear) or packed is None:
        return None
    found = _scheme_for(name, module, qblock)
    if found is None:
        raise SlimError(f"{path}: layer {name} has packed weights but no config group targets it; the folder is corrupt")
    _, scheme = found
    scale = read(f"{name}.weight_scale")
    if scale.dtype != torch.float16 and torch.equal(scale.to(torch.float16).to(scale.dtype), scale):
        scale = scale.to(torch.float16)  # slimlm's own scale precision, widened on export: take it back
    scale_dtype = str(scale.dtype).removeprefix("torch.")
    if scale_dtype not in SCALE_DTYPES:
        raise SlimError(f"{path}: layer {name} has {scale_dtype} scales; expected one of {', '.join(SCALE_DTYPES)}")
    scheme = QuantScheme.from_dict({**scheme.to_dict(), "scale_dtype": scale_dtype})
    n, k = module.out_features, module.in_features
    shape = read(f"{name}.weight_shape")
    if shape is not None and [int(v) for v in shape] != [n, k]:
        raise SlimError(f"{path}: layer {name} is stored as {shape.tolist()} but the architecture has ({n}, {k})")
    layer = QuantizedLinear(k, n, scheme, bias=module.bias is not None, dtype=dtype)
    codes = unpack_int32(packed, scheme.bits, k)
    layer.qweight.copy_(P.pack(codes, scheme.bits))
    layer.scale.copy_(scale)
    zero = read(f"{name}.weight_zero_point")
    if layer.zero is not None:
        if zero is None:
            raise SlimError(f"{path}: asymmetric layer {name} has no weight_zero_point; the folder is corrupt")
        layer.zero.copy_(unpack_int32(zero.t().contiguous(), scheme.bits, n).t())
    if module.bias is not None:
        layer.bias.copy_(read(f"{name}.bias"))
    return layer


def load_compressed_tensors(path, raw: dict[str, Any], qblock: dict[str, Any], dtype: torch.dtype | None) -> nn.Module:
    """Build a slimlm model (QuantizedLinear layers) from a pack-quantized compressed-tensors folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_ct_format(path, qblock)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model_dtype = dtype or getattr(config, "dtype", None) or torch.float32
    model_dtype = getattr(torch, model_dtype) if isinstance(model_dtype, str) else model_dtype
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=model_dtype)
    state = read_safetensors(path)
    for name, module in list(model.named_modules()):
        layer = build_ct_layer(path, name, module, qblock, lambda key: state.pop(key, None), model_dtype)
        if layer is not None:
            replace_module_(model, name, layer)
    assign_state_(model, state, path)
    return model
