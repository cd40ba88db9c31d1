"""Text data for evaluation and calibration: local files or the built-in corpus, as token ids.

Sources: 'demo' (the demo model's held-out split of CPython's documentation), a .txt file
(documents separated by lines that read `<|endoftext|>`, or one document if there are none), or
a .jsonl file with a "text" field per line; `source@A:B` keeps documents A..B-1 (so calibration
and evaluation can use disjoint parts of one file). Each document is encoded with the tokenizer's BOS token
in front (or EOS when there is no BOS), and the documents are concatenated.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from slimlm.core.errors import SlimError

DOC_SEPARATOR = "<|endoftext|>"


def demo_corpus_path() -> Path:
    from slimlm.core.model_io import demo_path

    return demo_path() / "heldout.txt"


def split_range(source: str | os.PathLike) -> tuple[str, slice]:
    """'file.txt@100:200' -> ('file.txt', slice(100, 200)): a range of documents (either end optional)."""
    text = str(source)
    head, sep, tail = text.rpartition("@")
    if not sep or ":" not in tail:
        return text, slice(None)
    try:
        start, stop = (int(v) if v else None for v in tail.split(":", 1))
    except ValueError:
        raise SlimError(f"document range '{tail}' in '{text}' must look like 100:200, :500 or 500:") from None
    return head, slice(start, stop)


def read_documents(source: str | os.PathLike) -> list[str]:
    """Documents of 'demo', a .txt or a .jsonl file, optionally a range of them ('file.txt@0:500')."""
    source, docs_range = split_range(source)
    docs = _read_all_documents(source)[docs_range]
    if not docs:
        raise SlimError(f"document range {docs_range.start}:{docs_range.stop} of '{source}' is empty; "
                        f"the file has {len(_read_all_documents(source))} documents")
    return docs


def _read_all_documents(source: str) -> list[str]:
    path = demo_corpus_path() if str(source) == "demo" else Path(source).expanduser()
    if not path.is_file():
        raise SlimError(f"data file '{path}' does not exist; pass a .txt or .jsonl file, or 'demo'")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SlimError(f"cannot read data file '{path}' as UTF-8 text ({e}); pass a .txt or .jsonl file") from None
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise SlimError(f"{path} line {i} is not valid JSON; each line of a .jsonl file must be one object") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise SlimError(f'{path} line {i} has no "text" string field; write {{"text": "..."}} per line')
            docs.append(record["text"])
    else:
        docs = [d.strip("\n") for d in text.split(f"\n{DOC_SEPARATOR}\n")]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise SlimError(f"data file '{path}' holds no text; pass a file with some documents in it")
    return docs


def encode_documents(tokenizer, docs: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """Token ids (T,) of the documents, each preceded by BOS (or EOS), truncated to max_tokens."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        if start is not None:
            ids.append(start)
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens] if max_tokens is not None else ids
    if len(ids) < 2:
        raise SlimError("the data encodes to fewer than 2 tokens; pass more text")
    return torch.tensor(ids, dtype=torch.long)


def load_tokens(source: str | os.PathLike, tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    return encode_documents(tokenizer, read_documents(source), max_tokens)
