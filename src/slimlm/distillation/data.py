"""Training data: text (.txt, .jsonl, 'demo', with document ranges) tokenized and packed into
fixed-length blocks."""

from __future__ import annotations

from torch import Tensor

from slimlm.core.errors import SlimError


def pack_blocks(ids: Tensor, seq_len: int) -> Tensor:
    """Token stream (T,) -> non-overlapping blocks (T // seq_len, seq_len); the tail is dropped."""
    n = ids.numel() // seq_len
    if n < 1:
        raise SlimError(f"the data has {ids.numel()} tokens, fewer than one {seq_len}-token block; "
                        "pass more text or a smaller --seq-len")
    return ids[: n * seq_len].view(n, seq_len)


def load_blocks(source: str, tokenizer, seq_len: int, max_tokens: int | None = None) -> Tensor:
    from slimlm.core.data import load_tokens

    return pack_blocks(load_tokens(source, tokenizer, max_tokens), seq_len)
