"""Every key slimlm writes into a saved model's config.json, and the version of each block.

A block written by a newer slimlm than this one (a higher version) is refused with a clear message
rather than read wrongly; a block without a version was written before versions existed (version 1).

  quantization_config   compressed layers grouped by kind and scheme: {"quant_method": "slimlm",
                        "format_version": 1, "groups": [{"kind", "scheme", "modules"}]}
                        (or another tool's block, e.g. compressed-tensors, which that format versions)
  slimlm_sparsity       what unstructured/n:m pruning did: {"version", "method", "sparsity", "pattern",
                        "targets", "measured", "storage": {"format": "bitmask", "layers"}}
  slimlm_structured     how structured pruning chose what to remove: {"version", "method", "sparsity",
                        "importance"} (the new sizes are the config's own fields)
  slimlm_module_shapes  (out, in) per linear layer where one config value cannot describe them
                        (channels pruned globally): {"version", "layers": {name: [out, in]}}
  model_type            "slimlm" in a folder that plain transformers would read wrongly (slimlm's own
                        quantized layers, bitmask-compressed sparse weights, per-layer shapes): transformers
                        then refuses it ("model type `slimlm` ... not recognized") instead of loading
                        random weights for the layers it does not understand; the architecture's own
                        model type is kept in `slimlm_model_type`
"""

from __future__ import annotations

from typing import Any

from slimlm.core.errors import SlimError

QUANTIZATION = "quantization_config"
QUANT_METHOD = "slimlm"  # quantization_config.quant_method of slimlm's own format
QUANT_VERSION = 1  # quantization_config.format_version
SPARSITY = "slimlm_sparsity"
SPARSITY_VERSION = 1
STRUCTURED = "slimlm_structured"
STRUCTURED_VERSION = 1
MODULE_SHAPES = "slimlm_module_shapes"
MODULE_SHAPES_VERSION = 1

GUARD = "slimlm"  # model_type of a folder only slimlm reads correctly
ORIGINAL_MODEL_TYPE = "slimlm_model_type"

KEYS = (QUANTIZATION, SPARSITY, STRUCTURED, MODULE_SHAPES, ORIGINAL_MODEL_TYPE)


def needs_guard(config: dict[str, Any]) -> bool:
    """Whether plain transformers would read a folder with this config.json wrongly (see GUARD)."""
    block = config.get(QUANTIZATION)
    sparse = config.get(SPARSITY)
    return bool((isinstance(block, dict) and block.get("quant_method") == QUANT_METHOD)
                or (isinstance(sparse, dict) and sparse.get("storage")) or config.get(MODULE_SHAPES))


def guard_(config: dict[str, Any]) -> dict[str, Any]:
    """Set the guard on a config.json dict about to be written (or drop a stale one); return it."""
    original = config.pop(ORIGINAL_MODEL_TYPE, None)
    if config.get("model_type") == GUARD:
        config["model_type"] = original
    if needs_guard(config):
        config[ORIGINAL_MODEL_TYPE], config["model_type"] = config["model_type"], GUARD
    return config


def unguard_(config: dict[str, Any], where: Any) -> dict[str, Any]:
    """The config.json dict read from disk with the architecture's model type restored (the marker key
    `slimlm_model_type` stays, so a reader knows the file on disk is guarded); return it."""
    if config.get("model_type") == GUARD:
        original = config.get(ORIGINAL_MODEL_TYPE)
        if not isinstance(original, str) or not original or original == GUARD:
            raise SlimError(f"{where}: config.json's model_type is 'slimlm' but {ORIGINAL_MODEL_TYPE} is missing; "
                            "the folder is corrupt, re-save it")
        config["model_type"] = original
    return config


def check_version(key: str, version: Any, known: int, where: Any) -> None:
    """Refuse a block of a format version this slimlm does not read."""
    if version is None:
        return  # written before blocks carried versions: version 1
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SlimError(f"{where}: config.json's {key} has format version {version!r}; the folder is corrupt, re-save it")
    if version > known:
        raise SlimError(f"{where} was saved by a newer slimlm ({key} format version {version}; this slimlm reads up "
                        f"to {known}); upgrade slimlm")


def read_block(raw: dict[str, Any], key: str, known: int, where: Any) -> dict[str, Any] | None:
    """config.json's block `key` (None when absent), its version checked."""
    block = raw.get(key)
    if block is None:
        return None
    if not isinstance(block, dict):
        raise SlimError(f"{where}: config.json's {key} is not an object; the folder is corrupt, re-save it")
    check_version(key, block.get("version"), known, where)
    return block


def module_shapes(raw: dict[str, Any], where: Any) -> dict[str, list[int]]:
    """The per-layer shapes of `slimlm_module_shapes` (also the unversioned name -> shape map of the first release)."""
    block = read_block(raw, MODULE_SHAPES, MODULE_SHAPES_VERSION, where) or {}
    layers = block.get("layers", block) if "version" in block else block
    if not all(isinstance(v, list) and len(v) == 2 for v in layers.values()):
        raise SlimError(f"{where}: config.json's {MODULE_SHAPES} does not list [out, in] per layer; re-save the folder")
    return layers


def shapes_block(layers: dict[str, list[int]]) -> dict[str, Any]:
    return {"version": MODULE_SHAPES_VERSION, "layers": layers}
