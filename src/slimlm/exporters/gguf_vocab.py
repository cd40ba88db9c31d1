"""A Hugging Face tokenizer as GGUF vocabulary keys (what llama.cpp's tokenizer needs).

Two tokenizer kinds can be expressed, read from the folder's `tokenizer.json`:
- byte-level BPE (GPT-2, Llama 3, Qwen2, slimlm's demo): `tokenizer.ggml.model = gpt2`, the tokens
  in id order, the merges, and `tokenizer.ggml.pre` naming the pre-tokenizer's split rule, which
  llama.cpp implements by name (so an unknown rule is refused rather than tokenized differently);
- SentencePiece-style BPE with byte fallback (Llama 1/2, Mistral, TinyLlama, stories260K):
  `tokenizer.ggml.model = llama`, with a score per token. llama.cpp's SentencePiece tokenizer merges
  the adjacent pair whose result has the highest score; Hugging Face's BPE merges the pair of lowest
  rank; so a merged token scores minus its merge rank and the two agree.
Special tokens, BOS/EOS/pad ids, add-BOS/EOS flags and the chat template come from gguf's own
`SpecialVocab`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from slimlm.core.errors import SlimError

# pre-tokenizer split regex (as tokenizer.json writes it) -> llama.cpp's name for it
PRE_TOKENIZERS = {
    # GPT-2's rule, which `ByteLevel(use_regex=True)` applies
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+": "gpt-2",
    # Llama 3
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe",
    # Qwen2
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "qwen2",
}
GPT2_RULE = next(iter(PRE_TOKENIZERS))


def _pre_tokenizer_rule(pre: dict | None) -> str | None:
    """The split regex a byte-level pre-tokenizer applies (None: it does not split)."""
    if pre is None:
        return None
    if pre.get("type") == "ByteLevel":
        return GPT2_RULE if pre.get("use_regex", True) else None
    if pre.get("type") == "Split":
        pattern = pre.get("pattern", {})
        return pattern.get("Regex") or re.escape(pattern.get("String", ""))
    if pre.get("type") == "Sequence":
        rules = [r for r in (_pre_tokenizer_rule(p) for p in pre.get("pretokenizers", [])) if r is not None]
        if len(rules) > 1:
            raise SlimError("the tokenizer splits text with several rules in sequence, which GGUF cannot name; "
                            "export with --format hf instead")
        return rules[0] if rules else None
    raise SlimError(f"the tokenizer's pre-tokenizer '{pre.get('type')}' has no llama.cpp equivalent; export with --format hf")


def _tokens_by_id(t: dict) -> list[str]:
    vocab: dict[str, int] = dict(t["model"]["vocab"])
    for added in t.get("added_tokens", []):
        vocab.setdefault(added["content"], added["id"])
    size = max(vocab.values()) + 1
    tokens = [None] * size
    for text, i in vocab.items():
        tokens[i] = text
    missing = [i for i, x in enumerate(tokens) if x is None]
    if missing:
        raise SlimError(f"the tokenizer has no token for ids {missing[:5]}; GGUF needs every id up to {size - 1}")
    return tokens


def _merges(t: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in t["model"].get("merges", [])]


def vocab_keys(folder: Path, vocab_size: int) -> dict[str, Any]:
    """The tokenizer's GGUF keys: {"model", "pre", "tokens", "scores", "types", "merges",
    "add_space_prefix"} (None where a kind has no such key). Raises SlimError when the tokenizer
    cannot be expressed."""
    from gguf import TokenType

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise SlimError(f"{folder} has no tokenizer.json; GGUF needs the tokenizer (save it with the model, or export "
                        "with --format hf)")
    t = json.loads(path.read_text(encoding="utf-8"))
    model = t.get("model", {})
    if model.get("type") != "BPE":
        raise SlimError(f"the tokenizer is a {model.get('type')} model; slimlm writes GGUF for BPE tokenizers "
                        "(byte-level or SentencePiece-style); export with --format hf")
    tokens = _tokens_by_id(t)
    if len(tokens) > vocab_size:
        raise SlimError(f"the tokenizer has {len(tokens)} tokens but the model's vocabulary is {vocab_size}")
    real = len(tokens)
    tokens += [f"[PAD{i}]" for i in range(real, vocab_size)]  # llama.cpp wants one token per logit
    special = {a["id"] for a in t.get("added_tokens", []) if a.get("special")}
    added = {a["id"] for a in t.get("added_tokens", [])}
    merges = _merges(t)
    types = []
    if model.get("byte_fallback"):
        rank = {}
        for r, m in enumerate(merges):
            rank.setdefault(m.replace(" ", ""), r)
        scores = [-float(rank[x]) if x in rank else 0.0 for x in tokens]
        unk = model.get("unk_token")
        for i, x in enumerate(tokens):
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", x):
                types.append(TokenType.BYTE)
            elif x == unk:
                types.append(TokenType.UNKNOWN)
            elif i in special:
                types.append(TokenType.CONTROL)
            elif i in added:
                types.append(TokenType.USER_DEFINED)
            elif i >= real:
                types.append(TokenType.UNUSED)
            else:
                types.append(TokenType.NORMAL)
        text = json.dumps(t.get("pre_tokenizer")) + json.dumps(t.get("normalizer"))
        prefix = '"prepend_scheme": "first"' in text or '"prepend_scheme": "always"' in text or '"Prepend"' in text \
            or '"add_prefix_space": true' in text
        return {"model": "llama", "pre": "default", "tokens": tokens, "scores": scores, "types": types,
                "merges": None, "add_space_prefix": prefix}
    if (t.get("decoder") or {}).get("type") != "ByteLevel":
        raise SlimError("the tokenizer is BPE without byte fallback and without a byte-level decoder, which GGUF "
                        "cannot express; export with --format hf")
    if t.get("normalizer") is not None:
        raise SlimError(f"the tokenizer normalizes text ({t['normalizer'].get('type')}), which llama.cpp's byte-level "
                        "tokenizer does not; export with --format hf")
    rule = _pre_tokenizer_rule(t.get("pre_tokenizer"))
    if rule not in PRE_TOKENIZERS:
        raise SlimError("the tokenizer's split rule is not one llama.cpp knows (GPT-2, Llama 3, Qwen2); "
                        "export with --format hf")
    for i in range(len(tokens)):
        types.append(TokenType.CONTROL if i in special else TokenType.USER_DEFINED if i in added
                     else TokenType.UNUSED if i >= real else TokenType.NORMAL)
    return {"model": "gpt2", "pre": PRE_TOKENIZERS[rule], "tokens": tokens, "scores": None, "types": types,
            "merges": merges, "add_space_prefix": False}
