"""Structured output: `response_format` {"type": "json_object"} or {"type": "json_schema", ...} on
completions and chat. The grammar engine is llguidance (`pip install 'slimlm[structured]'`), which
compiles a JSON schema into a grammar over the tokenizer's tokens and, each step, gives the bitmask of
the tokens that keep the output a valid prefix; the scheduler applies it to the logits before
sampling (greedy and sampled decoding alike) and feeds the chosen token back. Once the value is
complete only the end of sequence is allowed, so a request ends with a document that parses and
validates against the schema (unless max_tokens cuts it first, reported as finish_reason "length",
as OpenAI does).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from slimlm.core.errors import SlimError

_SHIFTS = torch.arange(32, dtype=torch.int32)
_TOKENIZERS: dict[int, Any] = {}  # id(hf tokenizer) -> (hf tokenizer, LLTokenizer); building one takes ~1 s
_LOCK = threading.Lock()


def _llguidance():
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch
    except ImportError:
        raise SlimError("structured output (response_format) needs llguidance: pip install 'slimlm[structured]'") from None
    return llguidance


def grammar_for(response_format: dict) -> str | None:
    """The grammar of an OpenAI `response_format`, None for plain text; SlimError when it is malformed."""
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise SlimError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
        schema = spec.get("schema", {})
    else:
        raise SlimError(f"response_format type {kind!r} is not supported; use text, json_object or json_schema")
    ll = _llguidance()
    try:
        # compact JSON: free whitespace between tokens lets a weak model pad forever
        return ll.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    except (ValueError, TypeError) as e:
        raise SlimError(f"response_format: the JSON schema is not valid: {e}") from None


class Constraint:
    """One request's grammar state: `mask(logits)` keeps the allowed tokens, `advance(token)` consumes."""

    def __init__(self, matcher, vocab: int, grammar: str = "") -> None:
        self.matcher, self.vocab, self.grammar = matcher, vocab, grammar  # grammar: for an engine process
        self.bitmask = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (1, V) with every token the grammar forbids at -inf (a copy, in float32). The bits are
        unpacked here (llguidance's own apply compiles a kernel with torch.compile on first use, ~1.4 s)."""
        ll = _llguidance()
        ll.torch.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        allowed = ((self.bitmask[0, :, None] >> _SHIFTS) & 1).reshape(-1)[: logits.shape[-1]].bool()  # (V,)
        out = logits.float().masked_fill(~allowed.to(logits.device), float("-inf"))
        return out

    def advance(self, token: int) -> None:
        self.matcher.consume_token(token)
        if self.matcher.is_error():
            raise SlimError(f"the grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The value is complete (nothing but the end of sequence may follow)."""
        return self.matcher.is_stopped()


def constraint_factory(grammar: str, tokenizer, vocab: int):
    """A function making a fresh `Constraint` per request (choice) for this grammar, after checking the
    grammar compiles against the tokenizer (SlimError otherwise: the request is a 400)."""
    ll = _llguidance()
    with _LOCK:
        entry = _TOKENIZERS.get(id(tokenizer))
        if entry is None or entry[0] is not tokenizer:
            entry = (tokenizer, ll.hf.from_tokenizer(tokenizer, n_vocab=vocab))
            _TOKENIZERS[id(tokenizer)] = entry
    lltok = entry[1]
    error = ll.LLMatcher.validate_grammar(grammar, lltok)
    if error and not error.startswith("WARNING"):
        raise SlimError(f"response_format: the JSON schema cannot be used: {error.splitlines()[0]}")

    def make() -> Constraint:
        return Constraint(ll.LLMatcher(lltok, grammar, log_level=0), vocab, grammar)

    return make
