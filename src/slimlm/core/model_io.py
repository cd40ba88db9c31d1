"""Loading and saving Hugging Face causal-LM folders, compressed or not.

`load_model(path)` returns (model, tokenizer). A plain HF folder goes through transformers'
`from_pretrained` (safetensors or .bin, sharded or not; it builds on the meta device and assigns
weights). A folder slimlm compressed carries a `quantization_config` block with
`quant_method: "slimlm"`: the skeleton is built with parameters on the meta device, the listed
layers are swapped for their compressed modules, and the checkpoint's tensors, read straight from
the files into huge-page memory (`files.read_safetensors`), are assigned in place
(`load_state_dict(assign=True)`), so no weight is ever materialised twice, and no page of the file
is mapped into the process beside them.

`save_model(...)` writes an ordinary HF folder (config.json, safetensors shards, tokenizer, plus
any extra files such as the recipe and the report) into a temporary folder beside the target and
renames it into place, so a crash never leaves a half-written model.
"""

from __future__ import annotations

import contextlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from slimlm.core import format as F
from slimlm.core.errors import SlimError
from slimlm.core.files import (
    atomic_folder,
    dedup_state,
    read_safetensors,
    write_safetensors,
)
from slimlm.core.files import first_line as _first_line
from slimlm.core.layers import FLOAT_DTYPES, float_dtype, is_compressed, replace_module_
from slimlm.core.registry import Registry

DEMO = "demo"
MAX_SHARD_BYTES = 2 * 1024**3
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")

# The loader's plug-in tables (see core/registry.py: built-ins named here, loaded on first use).
# Compressed module kinds a checkpoint may contain: kind -> builder(group entry, original module)
# returning an empty skeleton on the meta device; a compressed module class carries `slimlm_kind` and
# a `slimlm_spec()` dict that its builder reads back.
COMPRESSED_MODULES: Registry[Callable[[dict[str, Any], nn.Module], nn.Module]] = Registry("compressed layer kind", {
    "quantized_linear": "slimlm.quant.linear:quantized_skeleton",
    "w8a8_linear": "slimlm.quant.w8a8:w8a8_skeleton",
})
# Other tools' quantized formats slimlm reads itself: `quant_method` -> loader(path, raw config,
# quantization_config, dtype) returning the model.
FOREIGN_FORMATS: Registry[Callable[..., nn.Module]] = Registry("checkpoint format", {
    "compressed-tensors": "slimlm.quant.compressed_tensors_io:load_compressed_tensors",
})
# The same formats, one layer at a time: `quant_method` -> builder(path, name, float skeleton module,
# quantization_config, read(key) -> tensor or None, dtype) returning the compressed layer (or None where
# the format leaves the layer as it is). Tensor-parallel loading builds a layer at a time with it.
FOREIGN_LAYERS: Registry[Callable[..., nn.Module | None]] = Registry("checkpoint format", {
    "compressed-tensors": "slimlm.quant.compressed_tensors_io:build_ct_layer",
})
# config.json's slimlm_sparsity.storage.format -> decoder(raw config, state) that restores dense
# tensors in place.
STATE_DECODERS: Registry[Callable[[dict, dict], None]] = Registry("sparse storage format", {
    "bitmask": "slimlm.pruning.storage:decode_sparse_",
})


def demo_path() -> Path:
    return Path(str(resources.files("slimlm") / "assets" / "demo"))


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """'demo' -> the built-in model; otherwise a local folder, checked to look like an HF model."""
    if str(name_or_path) == DEMO:
        return demo_path()
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise SlimError(f"model folder '{path}' does not exist; pass a local Hugging Face model folder or 'demo'")
    if not path.is_dir():
        raise SlimError(f"'{path}' is a file, not a model folder; pass the folder that holds config.json")
    if not (path / "config.json").is_file():
        raise SlimError(f"'{path}' has no config.json; pass a Hugging Face model folder (config.json + weights)")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise SlimError(f"'{path}' has no weights (model.safetensors or pytorch_model.bin); re-save or re-download it")
    return path


def read_config_json(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SlimError(f"{path / 'config.json'} is not valid JSON ({e}); restore it from the original model") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise SlimError(f"{path / 'config.json'} has no model_type; it is not a Hugging Face model config")
    return F.unguard_(config, path)


def causal_lm_config(path: Path, raw: dict[str, Any]):
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if F.ORIGINAL_MODEL_TYPE in raw:  # guarded on disk: transformers would refuse the file itself
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING

            config = CONFIG_MAPPING[raw["model_type"]].from_dict(
                {k: v for k, v in raw.items() if k not in ("model_type", F.ORIGINAL_MODEL_TYPE)})
        else:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # ValueError, KeyError, huggingface_hub's StrictDataclassClassValidationError
        config = _pruned_heads_config(raw)
        if config is None:
            import transformers

            known = raw["model_type"] in _model_types()
            why = f"its config is invalid: {_first_line(e)[:200]}" if known else "the architecture is unknown"
            raise SlimError(f"model type '{raw['model_type']}' in {path} is not supported by transformers "
                            f"{transformers.__version__} ({why}); upgrade transformers or fix config.json") from None
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise SlimError(
            f"model type '{raw['model_type']}' in {path} is not a causal language model; "
            "slimlm compresses decoder LMs such as llama, mistral, qwen2, gpt2, opt, phi3"
        )
    return config


def _model_types() -> set[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return set(CONFIG_MAPPING_NAMES)


def _pruned_heads_config(raw: dict[str, Any]):
    """The config of a model whose attention heads were pruned to a count that does not divide the
    hidden size (head_dim is explicit). transformers' Llama config refuses such counts at creation
    although its modules run them, so create it with one head and set the counts afterwards."""
    from transformers import AutoConfig

    heads, kv, hidden = raw.get("num_attention_heads"), raw.get("num_key_value_heads"), raw.get("hidden_size")
    if not (raw.get("head_dim") and isinstance(heads, int) and isinstance(hidden, int) and hidden % heads):
        return None
    values = {k: v for k, v in raw.items() if k != "model_type"}
    values["num_attention_heads"] = values["num_key_value_heads"] = 1
    try:
        config = AutoConfig.for_model(raw["model_type"], **values)
    except Exception:  # noqa: BLE001 - not a config we can repair: the caller reports the original error
        return None
    config.num_attention_heads, config.num_key_value_heads = heads, kv or heads
    return config


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Create module parameters on the meta device (no memory), keep buffers (RoPE tables) real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _no_init():
    """transformers' switch that skips weight initialisation (its torch.nn.init functions become no-ops),
    or a no-op context where this transformers lacks it."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return contextlib.nullcontext()
    return no_init_weights()


def load_tokenizer(path: Path, config: Any = None):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, **({"config": config} if config else {}))
    except (OSError, ValueError, TypeError) as e:
        raise SlimError(f"no usable tokenizer in {path} ({str(e).splitlines()[0]}); add tokenizer.json") from None


def load_model(name_or_path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: str = "cpu"):
    """Load (model, tokenizer) from 'demo' or a local HF causal-LM folder, compressed or not.

    dtype (a torch dtype or its name) None keeps the checkpoint's float dtype, except float16 on CPU,
    which loads as float32.
    """
    if isinstance(dtype, str):
        if dtype not in FLOAT_DTYPES:
            raise SlimError(f"dtype '{dtype}' is not supported; use one of {', '.join(FLOAT_DTYPES)}")
        dtype = FLOAT_DTYPES[dtype]
    path = resolve_model_path(name_or_path)
    raw = read_config_json(path)
    if dtype is None and device == "cpu" and raw.get("dtype", raw.get("torch_dtype")) == "float16":
        dtype = torch.float32  # fp16 matmuls on CPU are slow and lossy; bf16 and fp32 load as stored
    qblock = raw.get(F.QUANTIZATION)
    method = qblock.get("quant_method") if isinstance(qblock, dict) else None
    F.read_block(raw, F.STRUCTURED, F.STRUCTURED_VERSION, path)
    if method == F.QUANT_METHOD or _sparse_storage(raw, path) or raw.get(F.MODULE_SHAPES):
        model = _load_skeleton(path, raw, dtype)
    elif method in FOREIGN_FORMATS:
        causal_lm_config(path, raw)
        model = FOREIGN_FORMATS.get(method)(path, raw, qblock, dtype)
        if dtype is not None:
            model.to(dtype)
    else:
        model = _load_plain(path, raw, dtype)
    model.eval()
    check_finite_(model, path)
    if device != "cpu":
        model.to(device)
    tokenizer = load_tokenizer(path, model.config)
    return model, tokenizer


def check_finite_(model: nn.Module, where: Any) -> None:
    """Refuse a model whose stored floating-point tensors hold NaN or infinity, naming the first one
    (checked in chunks, so the check never needs more than a few MB beyond the weights)."""
    chunk = 1 << 20  # 4 MB of float32 temporaries at most (16M-element chunks left ~110 MB with the allocator)
    for name, t in model.state_dict(keep_vars=True).items():
        if not t.is_floating_point() or t.is_meta:
            continue
        flat = t.detach().reshape(-1)
        for start in range(0, flat.numel(), chunk):
            if not bool(torch.isfinite(flat[start:start + chunk]).all()):
                raise SlimError(f"weights in {where} hold NaN or infinite values in '{name}'; the checkpoint is corrupt, "
                                "restore or re-create it")


def _sparse_storage(raw: dict[str, Any], path: Path) -> str | None:
    record = F.read_block(raw, F.SPARSITY, F.SPARSITY_VERSION, path)
    storage = record.get("storage") if record else None
    return storage.get("format") if isinstance(storage, dict) else None


def read_state(path: Path, raw: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, with sparse-stored weights restored to dense."""
    state = read_safetensors(path)
    fmt = _sparse_storage(raw, path)
    if fmt:
        STATE_DECODERS.get(fmt)(raw, state)
    return state


def build_skeleton(path: Path, raw: dict[str, Any], dtype: torch.dtype | None) -> nn.Module:
    """The model of a folder built on the meta device (no memory): its config's architecture, the layer
    shapes config.json records per layer (structured pruning), and slimlm's compressed layers where its
    quantization block names them. Loaders assign the checkpoint's tensors to it."""
    from transformers import AutoModelForCausalLM

    config = causal_lm_config(path, raw)
    qblock = raw.get(F.QUANTIZATION)
    compressed = isinstance(qblock, dict) and qblock.get("quant_method") == F.QUANT_METHOD
    if compressed:
        version = qblock.get("format_version")
        F.check_version(F.QUANTIZATION, version, F.QUANT_VERSION, path)
        if version is None:
            raise SlimError(f"{path}: config.json's {F.QUANTIZATION} has no format_version; the folder is corrupt, re-save it")
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the layers below are built by slimlm, not by a transformers quantizer
    float_dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(float_dtype, str):
        float_dtype = getattr(torch, float_dtype)
    with params_on_meta(), _no_init():  # no random init of weights about to be replaced (it touched every page)
        model = AutoModelForCausalLM.from_config(config, dtype=float_dtype)
    _reshape_linears_(model, F.module_shapes(raw, path), path)
    for group in qblock.get("groups", []) if compressed else []:
        kind = group.get("kind")
        if kind not in COMPRESSED_MODULES:
            raise SlimError(f"{path} uses compressed layer kind '{kind}' that this slimlm does not know "
                            f"(known: {', '.join(COMPRESSED_MODULES.names()) or 'none registered'}); upgrade slimlm")
        for name in group["modules"]:
            try:
                original = model.get_submodule(name)
            except AttributeError:
                raise SlimError(f"{path}: config lists layer '{name}' that the architecture does not have; the folder is corrupt") from None
            replace_module_(model, name, COMPRESSED_MODULES.get(kind)(group, original))
    return model


def _load_skeleton(path: Path, raw: dict[str, Any], dtype: torch.dtype | None) -> nn.Module:
    """Build the model on meta (`build_skeleton`) and assign the (decoded) checkpoint tensors."""
    model = build_skeleton(path, raw, dtype)
    assign_state_(model, read_state(path, raw), path)
    if dtype is not None:
        model.to(dtype)
    return model


def _reshape_linears_(model: nn.Module, shapes: dict[str, list[int]], path: Path) -> None:
    """Give linear layers the (out, in) shapes config.json records per layer (structured pruning that
    left layers of different sizes, which one config value cannot describe)."""
    for name, shape in shapes.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise SlimError(f"{path}: config lists layer '{name}' that the architecture does not have; the folder is corrupt") from None
        new = nn.Linear(shape[1], shape[0], bias=getattr(old, "bias", None) is not None, device="meta",
                        dtype=old.weight.dtype)
        replace_module_(model, name, new)


def _load_plain(path: Path, raw: dict[str, Any], dtype: torch.dtype | None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    config = causal_lm_config(path, raw)
    import pickle

    try:
        return AutoModelForCausalLM.from_pretrained(path, config=config, local_files_only=True, dtype=dtype or "auto")
    except pickle.UnpicklingError:
        raise SlimError(f"the .bin weights in {path} hold pickled objects other than tensors, which slimlm does not load "
                        "(a pickle can run code); convert the checkpoint to safetensors from a trusted copy") from None
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        text = _first_line(e)
        if "mismatched" in text or "size mismatch" in text:
            text = "a tensor's shape differs from what config.json describes"
        raise SlimError(f"could not load the weights in {path}: {text}; re-save or re-download the model") from None
    except Exception as e:  # safetensors raises its own SafetensorError for corrupt files
        if type(e).__name__ == "SafetensorError":
            raise SlimError(f"weights in {path} are corrupt or truncated ({e}); re-save or re-download them") from None
        raise


def assign_state_(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Assign a checkpoint's tensors to a skeleton built on meta (no copies), tie weights, and
    fail with a clear message if any tensor is missing, left over or of the wrong shape."""
    expected = model.state_dict(keep_vars=True)
    wrong = [k for k, t in state.items() if k in expected and tuple(t.shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise SlimError(f"weights in {path} do not match its config ('{k}' is {list(state[k].shape)}, the config says "
                        f"{list(expected[k].shape)}); the folder is corrupt, re-save it")
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta or unexpected:
        what = f"missing {still_meta[:3]}" if still_meta else f"unexpected {unexpected[:3]}"
        raise SlimError(f"weights in {path} do not match its config ({what}); the folder is corrupt, re-save it")


def compression_block(model: nn.Module) -> dict[str, Any] | None:
    """The config.json `quantization_config` block: compressed layers grouped by kind and spec."""
    groups: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if is_compressed(module):
            entry = {"kind": module.slimlm_kind, **module.slimlm_spec()}
            key = json.dumps(entry, sort_keys=True)
            groups.setdefault(key, {**entry, "modules": []})
            groups[key]["modules"].append(name)
    if not groups:
        return None
    return {"quant_method": F.QUANT_METHOD, "format_version": F.QUANT_VERSION, "groups": list(groups.values())}


def save_model(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer: Any = None,
    extra_files: dict[str, str] | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    exporter: Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, Any]] | None = None,
    encoder: Callable[[nn.Module, dict[str, torch.Tensor]], None] | None = None,
) -> Path:
    """Write `model` (and tokenizer and extra text files) as an HF folder at `path`, atomically.

    `exporter(model, state)` writes another tool's format: it rewrites the state dict in place and
    returns the config.json `quantization_config` (default: slimlm's own format). `encoder(model, state)`
    rewrites tensors for compact storage (before the exporter) and notes it in model.config."""
    with atomic_folder(path, overwrite) as tmp:
        state, aliases = dedup_state(model)
        if encoder is not None:
            encoder(model, state)
        config = model.config.to_dict()
        config["dtype"] = str(float_dtype(model)).removeprefix("torch.")
        block = exporter(model, state) if exporter else compression_block(model)
        if block is not None:
            config[F.QUANTIZATION] = block
        else:
            config.pop(F.QUANTIZATION, None)
        F.guard_(config)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        write_safetensors(state, aliases, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(path)
