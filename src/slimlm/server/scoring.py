"""Log-probabilities for the completions API: scoring a prompt (`echo` with `logprobs`, as evaluation
harnesses ask) and OpenAI's `logprobs` block. Scoring runs the model, so the server hands it to the
scheduler's thread (`Scheduler.call`); it never runs on the event loop."""

from __future__ import annotations

import torch

from slimlm.server.protocol import Logprobs

Score = tuple[float, list[tuple[int, float]]] | None  # (log-probability, top alternatives), None for the first


def score_prompt(model: torch.nn.Module, prompt: list[int], top_n: int) -> list[Score]:
    """(log-probability, top `top_n` alternatives) of each prompt token given the ones before it."""
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(torch.tensor([prompt], device=device)).logits[0].float().log_softmax(-1)  # (T, V)
    top = torch.topk(logits[:-1], max(top_n, 1), dim=-1)  # (T-1, k)
    chosen = logits[:-1].gather(-1, torch.tensor(prompt[1:], device=device)[:, None])[:, 0]  # (T-1,)
    out: list[Score] = [None]
    for value, ids, values in zip(chosen.tolist(), top.indices.tolist(), top.values.tolist()):
        out.append((value, list(zip(ids, values))))
    return out


def logprobs_block(tokenizer, tokens: list[int], scores: list[Score]) -> Logprobs:
    """OpenAI's completions `logprobs`: tokens, their log-probabilities, the top alternatives, offsets."""
    texts = [tokenizer.decode([t]) for t in tokens]
    offsets, pos = [], 0
    for t in texts:
        offsets.append(pos)
        pos += len(t)
    return Logprobs(tokens=texts, token_logprobs=[s[0] if s else None for s in scores],
                    top_logprobs=[{tokenizer.decode([t]): v for t, v in s[1]} if s else None for s in scores],
                    text_offset=offsets)
