"""Size figures: parameter count, bytes of weights, bits per weight, and a per-layer description."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from slimlm.core.layers import is_compressed, is_linear, output_head_name, weight_matrix


def _persistent_tensors(model: nn.Module):
    """(name, tensor) for everything the state dict holds, each storage once (tied weights count once)."""
    seen = set()
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        yield name, t


def parameter_count(model: nn.Module) -> int:
    """Logical parameters: a quantized layer counts its N*K weights (+ bias), not its packed bytes."""
    total = 0
    seen = set()
    for module in model.modules():
        if is_compressed(module):
            total += module.in_features * module.out_features + (module.out_features if module.bias is not None else 0)
        else:
            for p in module.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
    return total


def weight_bytes(model: nn.Module) -> int:
    """Bytes of everything the checkpoint stores (parameters and persistent buffers, deduplicated)."""
    return sum(t.numel() * t.element_size() for _, t in _persistent_tensors(model))


@dataclass
class SizeResult:
    parameters: int
    weight_bytes: int
    bits_per_weight: float  # over the whole checkpoint
    linear_bits_per_weight: float  # over the linear layers except the output head (what quantization targets)

    def to_dict(self) -> dict:
        return asdict(self)


def measure_size(model: nn.Module) -> SizeResult:
    params = parameter_count(model)
    nbytes = weight_bytes(model)
    lin_bits, lin_count = 0, 0
    head = output_head_name(model)
    for name, module in model.named_modules():
        if name == head:
            continue
        if is_compressed(module):
            lin_bits += 8 * module.storage_bytes()
            lin_count += module.in_features * module.out_features
        elif is_linear(module):
            lin_bits += 8 * sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
            lin_count += module.weight.numel()
    return SizeResult(params, nbytes, 8 * nbytes / max(params, 1), lin_bits / max(lin_count, 1))


def describe_layers(model: nn.Module) -> list[dict]:
    """One row per linear layer: name, shape, scheme, bytes (what `slimlm inspect` prints)."""
    rows = []
    for name, module in model.named_modules():
        if is_compressed(module):
            rows.append(dict(name=name, shape=[module.out_features, module.in_features], scheme=module.scheme.label(),
                             bytes=module.storage_bytes(), kernel=module.kernel))
        elif is_linear(module) and name:
            w = weight_matrix(module)
            rows.append(dict(name=name, shape=list(w.shape), scheme=str(w.dtype).removeprefix("torch."),
                             bytes=sum(p.numel() * p.element_size() for p in module.parameters(recurse=False)), kernel=None))
    return rows
