"""What a GGUF file says about the model besides its tensors: which llama.cpp architecture it is, the
metadata keys llama.cpp reads for it, and the vocabulary; and which models cannot be written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimlm.core import format as F
from slimlm.core.errors import SlimError

# Hugging Face model_type -> (llama.cpp architecture, q/k rows permuted to interleaved rotary pairs)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
                 "phi3": ("phi3", False), "gpt2": ("gpt2", False)}


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - a base dependency
        raise SlimError("GGUF export needs the gguf package: pip install gguf") from e
    return gguf


def check_exportable(model: nn.Module) -> str:
    """llama.cpp's architecture for `model`, or SlimError naming what cannot be exported."""
    config = model.config
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise SlimError(f"GGUF export supports {', '.join(sorted(ARCHITECTURES))} models, not '{kind}'; "
                        "export with --format hf")
    if getattr(config, F.MODULE_SHAPES, None):
        raise SlimError("this model was pruned to different sizes per layer, which llama.cpp cannot load (one size "
                        "for all layers); prune with a uniform setting, or export with --format hf")
    rope = _rope(config) if kind != "gpt2" else {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "linear", "yarn", "llama3"):
        raise SlimError(f"rope scaling '{rope.get('rope_type', rope.get('type'))}' is not one slimlm writes to GGUF "
                        "(default, linear, yarn, llama3); export with --format hf")
    if kind != "gpt2":
        from slimlm.core.layers import in_features

        heads, head_dim = config.num_attention_heads, _head_dim(config)
        for i, layer in enumerate(model.model.layers):
            width = in_features(layer.self_attn.o_proj)
            if width != heads * head_dim:
                raise SlimError(f"layer {i} has {width // head_dim} attention heads and the config {heads}: heads were "
                                "pruned per layer, which llama.cpp cannot load; export with --format hf")
    return ARCHITECTURES[kind][0]


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope(config) -> dict[str, Any]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def _metadata(w, model: nn.Module, arch: str, name: str) -> None:
    gguf = _gguf()
    c = model.config
    w.add_name(name)
    w.add_context_length(int(c.max_position_embeddings))
    w.add_embedding_length(int(c.hidden_size))
    w.add_block_count(int(c.num_hidden_layers))
    w.add_head_count(int(c.num_attention_heads))
    w.add_vocab_size(int(c.vocab_size))
    if arch == "gpt2":
        w.add_feed_forward_length(int(getattr(c, "n_inner", None) or 4 * c.hidden_size))
        w.add_layer_norm_eps(float(c.layer_norm_epsilon))
        return
    rope = _rope(c)
    w.add_feed_forward_length(int(c.intermediate_size))
    w.add_head_count_kv(int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads))
    head_dim = _head_dim(c)
    w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0))))
    if head_dim != c.hidden_size // c.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_rope_freq_base(float(rope["rope_theta"]))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    window = getattr(c, "sliding_window", None)
    if window and getattr(c, "use_sliding_window", True) and window < c.max_position_embeddings:
        w.add_sliding_window(int(window))


def _rope_freqs(config) -> Tensor | None:
    """Llama 3's per-frequency rope factors (llama.cpp reads them as the tensor `rope_freqs`)."""
    rope = _rope(config)
    if rope.get("rope_type") != "llama3":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = _head_dim(config)
    plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return (plain / scaled.float()).float()


def _vocab(w, folder: Path, vocab_size: int) -> None:
    from slimlm.exporters.gguf_vocab import vocab_keys

    gguf = _gguf()
    v = vocab_keys(folder, vocab_size)
    w.add_tokenizer_model(v["model"])
    w.add_tokenizer_pre(v["pre"])
    w.add_token_list(v["tokens"])
    if v["scores"] is not None:
        w.add_token_scores(v["scores"])
    w.add_token_types(v["types"])
    if v["model"] == "llama":
        w.add_add_space_prefix(v["add_space_prefix"])
    special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=vocab_size)
    if v["merges"] is not None:
        special.merges = v["merges"]
    special.add_to_gguf(w, quiet=True)
