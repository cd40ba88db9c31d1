"""Sharded loading: each tensor-parallel rank reads only its slices from the safetensors files, so no
process ever holds the whole model.

The model is built on the meta device (`model_io.build_skeleton`: the architecture, slimlm's compressed
layers where the folder has them), then every projection that tensor parallelism splits is replaced by
its shard, whose stored tensors are read as slices (`SafetensorsReader.read_slice`: a compressed layer
says which slice of its codes, scales and zero points a shard keeps), and everything else (embeddings,
norms, the output head) is read whole. Peak memory per rank is its shard plus the replicated tensors.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from slimlm.core import format as F
from slimlm.core.errors import SlimError
from slimlm.core.files import SafetensorsReader
from slimlm.core.layers import FLOAT_DTYPES, float_dtype, is_compressed, replace_module_
from slimlm.core.model_io import (FOREIGN_LAYERS, assign_state_, build_skeleton, check_finite_, load_tokenizer,
                                  read_config_json, resolve_model_path)
from slimlm.engine.decoder import decoder_spec
from slimlm.parallel.tensor import DIMS, TPLayout, sharded_modules


def _intermediate(model: nn.Module) -> int:
    mlp = model.model.layers[0].mlp
    if hasattr(mlp, "gate_up_proj"):
        return mlp.gate_up_proj.out_features // 2
    return mlp.gate_proj.out_features


def _check_storage(path: Path, raw: dict) -> str | None:
    """The checkpoint's foreign format (read a layer at a time), None for plain or slimlm's own."""
    qblock = raw.get(F.QUANTIZATION)
    method = qblock.get("quant_method") if isinstance(qblock, dict) else None
    foreign = method if method not in (None, F.QUANT_METHOD) else None
    sparse = (raw.get(F.SPARSITY) or {}).get("storage") if isinstance(raw.get(F.SPARSITY), dict) else None
    if (foreign and foreign not in FOREIGN_LAYERS) or sparse or raw.get(F.MODULE_SHAPES):
        what = f"'{method}' checkpoints" if foreign else \
            "pruned weights stored as bitmasks" if sparse else "layers of different sizes"
        raise SlimError(f"tensor parallelism reads plain, slimlm-quantized or compressed-tensors safetensors; {path} "
                        f"holds {what}: re-save it with slimlm.save(model, out, format='slimlm') from a model loaded "
                        "in one process")
    if not (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").is_file():
        raise SlimError(f"tensor parallelism reads safetensors weights and {path} has none; re-save it with slimlm.save")
    return foreign


def _shard(meta: nn.Module, reader: SafetensorsReader, name: str, dim: int, ranges: list[tuple[int, int]],
           keep_bias: bool) -> nn.Module:
    """The shard of layer `name` (built on meta) with only its slices read from the files."""
    has_bias = getattr(meta, "bias", None) is not None
    bias = None
    if has_bias and (dim == 0 or keep_bias):
        bias = reader.read_slice(f"{name}.bias", 0, ranges) if dim == 0 else reader.read(f"{name}.bias")
    if is_compressed(meta):
        tensors = {key: reader.read_slice(f"{name}.{key}", d, rs) for key, (d, rs) in meta.shard_slices(dim, ranges, name).items()}
        if bias is not None:
            tensors["bias"] = bias
        return meta.empty_shard(dim, ranges, keep_bias).fill_(tensors)
    if not isinstance(meta, nn.Linear):
        raise SlimError(f"{name}: tensor parallelism splits nn.Linear and slimlm's compressed layers, not {type(meta).__name__}")
    weight = reader.read_slice(f"{name}.weight", dim, ranges)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def tp_layout(path: Path, raw: dict, world: int, rank: int, dtype=None):
    """(skeleton on meta, decoder spec, this rank's layout): what every rank checks before reading weights."""
    model = build_skeleton(path, raw, dtype)
    spec, why = decoder_spec(model)
    if spec is None:
        raise SlimError(f"tensor parallelism runs on slimlm's engine, which cannot run this model: {why}")
    return model, spec, TPLayout.for_spec(spec, _intermediate(model), world, rank)


def check_tp(name_or_path: str | os.PathLike, config) -> None:
    """Refuse, before any process starts, a model or a layout tensor parallelism cannot run."""
    path = resolve_model_path(name_or_path)
    raw = read_config_json(path)
    _check_storage(path, raw)
    tp_layout(path, raw, config.tp, 0)


def load_tp_shard(name_or_path: str | os.PathLike, world: int, rank: int, dtype: torch.dtype | str | None = None,
                  device: str = "cpu", split_head: bool = False, comm=None):
    """(model shard, tokenizer, layout, the shard's decoder spec) for rank `rank` of `world`. split_head:
    the output head split along the vocabulary (`VocabParallelHead`; comm times its gathers)."""
    if isinstance(dtype, str):
        dtype = FLOAT_DTYPES[dtype]
    path = resolve_model_path(name_or_path)
    raw = read_config_json(path)
    foreign = _check_storage(path, raw)
    if dtype is None and device == "cpu" and raw.get("dtype", raw.get("torch_dtype")) == "float16":
        dtype = torch.float32  # as model_io.load_model
    model, spec, layout = tp_layout(path, raw, world, rank, dtype)
    reader = SafetensorsReader(path)
    shard_names = sharded_modules(model)
    build = _foreign_builder(model, reader, path, raw, foreign, dtype) if foreign else (lambda name: None)
    for name, (split, index_set) in shard_names.items():
        dim, ranges = DIMS[split], layout.ranges(index_set)
        whole = build(name)  # a foreign format's layer, read whole (one at a time), then cut to its shard
        if whole is not None:
            replace_module_(model, name, whole.shard(dim, ranges, rank == 0, name))
        else:
            replace_module_(model, name, _shard(model.get_submodule(name), reader, name, dim, ranges, rank == 0))
    for name, module in list(model.named_modules()):  # foreign-quantized layers that are not split (the head)
        layer = build(name) if foreign and isinstance(module, nn.Linear) and module.weight.is_meta else None
        if layer is not None:
            replace_module_(model, name, layer)
    prefixes = tuple(f"{name}." for name in shard_names)
    rest = {key: reader.read(key) for key, t in model.state_dict(keep_vars=True).items()
            if t.is_meta and not key.startswith(prefixes) and key in reader.names()}
    assign_state_(model, rest, path)
    if split_head:
        _split_head_(model, reader, layout, path, comm)
    if dtype is not None:
        model.to(dtype)
    model.eval()
    check_finite_(model, path)
    if device != "cpu":
        model.to(device)
    return model, load_tokenizer(path, model.config), layout, layout.local_spec(spec)


def _split_head_(model: nn.Module, reader: SafetensorsReader, layout: TPLayout, path: Path, comm) -> None:
    """Replace the (already loaded) output head by this rank's rows of it and a gather of the logits."""
    from slimlm.parallel.tensor import VocabParallelHead

    head = model.lm_head
    vocab = head.out_features
    if vocab % layout.world:
        return  # the head stays replicated: its rows do not split evenly
    rows = [(layout.rank * vocab // layout.world, (layout.rank + 1) * vocab // layout.world)]
    if is_compressed(head):
        shard = head.shard(0, rows, True, "lm_head")
    else:  # a view of the loaded (possibly tied) weight: no copy
        shard = nn.Linear(head.in_features, rows[0][1] - rows[0][0], bias=False, device="meta", dtype=head.weight.dtype)
        shard.weight = nn.Parameter(head.weight.data[rows[0][0]:rows[0][1]], requires_grad=False)
    model.lm_head = VocabParallelHead(shard, layout.world, comm)


def _foreign_builder(model: nn.Module, reader: SafetensorsReader, path: Path, raw: dict, method: str, dtype):
    """name -> the layer a foreign checkpoint stores there, built whole (None where it stores a plain tensor)."""
    build, names, compute = FOREIGN_LAYERS.get(method), reader.names(), dtype or float_dtype(model)

    def read(key: str):
        return reader.read(key) if key in names else None

    def layer(name: str):
        return build(path, name, model.get_submodule(name), raw[F.QUANTIZATION], read, compute)

    return layer
