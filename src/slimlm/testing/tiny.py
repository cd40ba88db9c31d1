"""Tiny random causal LMs of each supported family, built in-process (no downloads).

Shapes are small but keep the features that matter: grouped-query attention, biases (Qwen2, OPT),
fused projections (Phi-3), GPT-2's Conv1D layers, tied and untied embeddings. Widths are multiples
of 16 and 32 so the fast int4/int8 kernels apply, except where a test wants otherwise.
"""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = (
    "Once upon a time there was a tiny model. It could count: one, two, three, four, five. "
    "The quick brown fox jumps over the lazy dog. def add(a, b): return a + b. "
    "Compression makes models smaller and faster; measurement proves it. 0123456789 "
)
EOS = "<|endoftext|>"


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on a few sentences (any text encodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS)


def _config(family: str, vocab: int, hidden: int, layers: int, **overrides):
    import transformers as tf

    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0)
    if family in ("llama", "mistral", "qwen2", "phi3"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config, "phi3": tf.Phi3Config}[family]
        cfg = dict(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=family in ("llama", "qwen2"),
        )
        if family == "phi3":
            cfg["pad_token_id"] = 0
    elif family == "gpt2":
        cls = tf.GPT2Config
        cfg = dict(n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    elif family == "opt":
        cls = tf.OPTConfig
        cfg = dict(
            hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
            max_position_embeddings=256, word_embed_proj_dim=hidden, dropout=0.0, pad_token_id=1,
        )
    else:
        raise ValueError(f"unknown family {family}; valid: {', '.join(FAMILIES)}")
    return cls(**{**common, **cfg, **overrides})


FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "opt", "phi3")


def tiny_model(family: str = "llama", vocab: int = 320, hidden: int = 64, layers: int = 2, seed: int = 0, **overrides):
    """A randomly initialised tiny causal LM of `family` in eval mode (fp32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family, vocab, hidden, layers, **overrides), dtype=torch.float32)
    with torch.no_grad():  # larger-than-default weights so quantization error is visible in tests
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


def save_tiny_model(path: str | Path, family: str = "llama", **kwargs) -> Path:
    """Save a tiny model and its tokenizer as an ordinary HF folder (via transformers)."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(family, vocab=len(tokenizer), **kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)
