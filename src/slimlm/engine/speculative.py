"""Speculative decoding (Leviathan, Kalman & Matias, "Fast Inference from Transformers via Speculative
Decoding", arXiv 2211.17192; Chen et al., arXiv 2302.01318): a draft proposes k tokens, the target
scores all of them in one forward over k + 1 positions, and the longest run it agrees with is kept,
plus one token of the target's own. A decode step reads every weight once whatever the number of
positions, so each accepted token saves a step.

- Greedy: a draft token is kept while it equals the target's argmax at its position, so the output is
  exactly plain greedy decoding.
- Sampling: draft token d, drawn from the draft's distribution q, is kept with probability
  min(1, p(d) / q(d)), p being the target's distribution (`sampling_probs`: the same temperature,
  top-k and top-p as plain sampling); at the first rejection the token is drawn from
  norm(max(0, p - q)); when all k are kept, one more is drawn from p. Every token is then distributed
  exactly as the target's own sampling would give it (the paper's theorem; `accept` is tested
  against p statistically).

Drafts: `NgramDraft` (prompt lookup: the tokens that followed the latest earlier occurrence of the
last n tokens; no model; its q is a point mass, so a token is kept with probability p(d)) and
`ModelDraft` (a small model with the same tokenizer on its own engine, e.g. a `slimlm distill`
student with fewer blocks).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import Tensor, nn

from slimlm.core.errors import SlimError
from slimlm.engine.sampling import SamplingParams, sample_next, sampling_probs


@dataclasses.dataclass
class SpecStats:
    target_steps: int = 0  # target forwards after the prompt (verifications and plain steps)
    proposed: int = 0
    accepted: int = 0
    emitted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.emitted / self.target_steps if self.target_steps else 0.0


def accept(target_logits: Tensor, proposal: list[int], draft_probs: Tensor | None, params: SamplingParams,
           generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """(tokens to emit, how many of the proposal were kept): the kept proposal tokens and one token of
    the target's. target_logits (k+1, V) score the positions after each of [last, d_1..d_k];
    draft_probs (k, V) the draft's distributions (None: the proposal was deterministic)."""
    k = len(proposal)
    if params.temperature <= 0:
        picks = target_logits.float().masked_fill(target_logits.float().isnan(), float("-inf")).argmax(-1).tolist()
        kept = 0
        while kept < k and proposal[kept] == picks[kept]:
            kept += 1
        return proposal[:kept] + [picks[kept]], kept
    p = sampling_probs(target_logits, params.temperature, params.top_k, params.top_p)  # (k+1, V)
    u = torch.rand(k, generator=generator).tolist()
    for i, d in enumerate(proposal):
        q_d = float(draft_probs[i, d]) if draft_probs is not None else 1.0
        if q_d > 0 and u[i] * q_d < float(p[i, d]):  # u < p/q
            continue
        q = draft_probs[i] if draft_probs is not None else torch.nn.functional.one_hot(
            torch.tensor(d), p.shape[-1]).to(p.dtype)
        residual = (p[i] - q).clamp(min=0)
        if float(residual.sum()) <= 0:  # p <= q everywhere, which only rounding allows: p itself
            residual = p[i]
        return proposal[:i] + [int(torch.multinomial(residual / residual.sum(), 1, generator=generator))], i
    return proposal + [int(torch.multinomial(p[k], 1, generator=generator))], k


class NgramDraft:
    """Prompt-lookup drafting: the k tokens that followed the latest earlier occurrence of the last n
    tokens of the sequence (n from `max_n` down to `min_n`); none when there is no such occurrence."""

    def __init__(self, max_n: int = 3, min_n: int = 1) -> None:
        if not 1 <= min_n <= max_n:
            raise SlimError(f"n-gram draft: need 1 <= min_n <= max_n (got {min_n}, {max_n})")
        self.max_n, self.min_n = max_n, min_n

    def propose(self, sequence: list[int], k: int, params: SamplingParams, generator=None,
                slot: int = 0) -> tuple[list[int], None]:
        for n in range(min(self.max_n, len(sequence) - 1), self.min_n - 1, -1):
            tail = sequence[-n:]
            for start in range(len(sequence) - n - 1, -1, -1):  # latest match first, not the tail itself
                if sequence[start:start + n] == tail:
                    return sequence[start + n:start + n + k], None
        return [], None

    def rollback(self, length: int, slot: int = 0) -> None:
        pass


class ModelDraft:
    """A small causal LM with the target's vocabulary proposing k tokens on its own engine (greedy for a
    greedy target, else sampled with the target's settings, its distributions returned).

    It keeps one cache slot per sequence it drafts for (`slot`, the server's slot of the request) and
    remembers the tokens each holds: a proposal feeds only what the sequence added since (after a
    rollback, or a new request on the slot, from their common prefix on; its own prefix cache serves a
    prompt it has seen). `propose_batch` drafts for several sequences with batched decode steps."""

    def __init__(self, model: nn.Module, max_len: int, slots: int = 1) -> None:
        from slimlm.engine.engine import Engine

        if not Engine.supports(model):
            raise SlimError("the draft model must run on slimlm's engine (a Llama-family model)")
        self.engine = Engine(model, slots=slots, max_len=max_len, prefix_caching=True)
        self.held: list[list[int]] = [[] for _ in range(slots)]  # the tokens in each slot's cache

    def _catch_up(self, slot: int, sequence: list[int]) -> Tensor:
        """Logits (V,) after `sequence`, feeding slot `slot` what it does not hold yet."""
        held, common = self.held[slot], 0
        limit = min(len(held), len(sequence) - 1)  # the last token is always fed: its logits are needed
        while common < limit and held[common] == sequence[common]:
            common += 1
        if common == 0:
            common = self.engine.reuse_prefix(slot, sequence)  # releases the slot first
        else:
            self.engine.truncate(slot, common)
        self.held[slot] = list(sequence[:common])
        logits = self.engine.append(slot, torch.tensor(sequence[common:]), read_back=common > 0)
        self.held[slot] = list(sequence)
        return logits

    def propose(self, sequence: list[int], k: int, params: SamplingParams, generator=None,
                slot: int = 0) -> tuple[list[int], Tensor | None]:
        tokens, probs = self.propose_batch([sequence], [slot], k, [params], [generator])
        return tokens[0], probs[0]

    def propose_batch(self, sequences: list[list[int]], slots: list[int], k: int, params: list[SamplingParams],
                      generators: list) -> tuple[list[list[int]], list[Tensor | None]]:
        """k tokens for each sequence (on its slot), and the draft's distributions (k, V) where sampled."""
        logits = torch.stack([self._catch_up(slot, seq) for slot, seq in zip(slots, sequences)])  # (B, V)
        tokens: list[list[int]] = [[] for _ in slots]
        probs: list[list[Tensor]] = [[] for _ in slots]
        for i in range(k):
            for b, p in enumerate(params):
                row = logits[b:b + 1]
                if p.temperature > 0:
                    q = sampling_probs(row, p.temperature, p.top_k, p.top_p)[0]
                    tokens[b].append(int(torch.multinomial(q, 1, generator=generators[b])))
                    probs[b].append(q)
                else:
                    tokens[b].append(int(sample_next(row)))
            if i + 1 < k:
                logits = self.engine.decode(torch.tensor(slots), torch.tensor([t[-1] for t in tokens]))
                for b, slot in enumerate(slots):
                    self.held[slot].append(tokens[b][-1])
        return tokens, [torch.stack(q) if q else None for q in probs]

    def rollback(self, length: int, slot: int = 0) -> None:
        pass  # the next proposal compares the sequence with what the slot holds


def make_draft(draft, max_len: int, slots: int = 1):
    """'ngram' (prompt lookup), a loaded model, a model folder, or anything with `propose` and
    `rollback` (as `NgramDraft`) -> a draft (a model draft with `slots` sequences)."""
    if hasattr(draft, "propose") and hasattr(draft, "rollback"):
        return draft
    if isinstance(draft, nn.Module):
        return ModelDraft(draft, max_len, slots)
    if draft == "ngram":
        return NgramDraft()
    from slimlm.core.model_io import load_model

    return ModelDraft(load_model(draft)[0], max_len, slots)


def propose_all(draft, sequences: list[list[int]], slots: list[int], budgets: list[int], params: SamplingParams,
                generator=None) -> list[tuple[list[int], Tensor | None]]:
    """Each sequence's proposal (at most its budget) and draft distributions: batched where the draft can."""
    if hasattr(draft, "propose_batch"):
        tokens, dists = draft.propose_batch(sequences, slots, max(budgets), [params] * len(slots),
                                            [generator] * len(slots))
    else:
        pairs = [draft.propose(seq, n, params, generator, slot=slot) for seq, slot, n in zip(sequences, slots, budgets)]
        tokens, dists = [t for t, _ in pairs], [q for _, q in pairs]
    return [(t[:n], q[:len(t[:n])] if q is not None else None) for t, q, n in zip(tokens, dists, budgets)]


@torch.no_grad()
def generate(model: nn.Module, ids: Tensor, params: SamplingParams, draft, k: int = 4,
             on_tokens: Callable[[Tensor], None] | None = None) -> tuple[Tensor, SpecStats]:
    """Tokens (B, n) continuing the prompts ids (B, T) with speculative decoding, and its statistics:
    each step the draft proposes up to k tokens per sequence and one forward scores all of them
    (`Engine.extend`). The same tokens as `generate_ids` when greedy; the same distribution when
    sampling. Rows that end early are padded with their last token. on_tokens (one prompt only)
    receives each token as it is accepted."""
    from slimlm.engine.engine import Engine

    b = ids.shape[0]
    if not isinstance(k, int) or k < 1:
        raise SlimError(f"num_speculative {k!r} must be at least 1")
    if on_tokens is not None and b > 1:
        raise SlimError("streaming speculative generation takes one prompt at a time")
    total = ids.shape[1] + params.max_new_tokens + k + 2
    engine = Engine(model, slots=b, max_len=total)
    draft = make_draft(draft, total, b)
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    stats = SpecStats()
    prompts = [row.tolist() for row in ids]
    outs: list[list[int]] = [[] for _ in range(b)]
    live = set(range(b)) if params.max_new_tokens > 0 else set()

    def emit(row: int, tokens: list[int]) -> None:
        """Append tokens up to a stop token or the limit; the row stops there."""
        for token in tokens:
            outs[row].append(token)
            stats.emitted += 1
            if on_tokens:
                on_tokens(torch.tensor([token]))
            if token in params.stop_ids or len(outs[row]) >= params.max_new_tokens:
                live.discard(row)
                return

    for row in sorted(live):
        logits = engine.prefill(row, ids[row])
        emit(row, [int(sample_next(logits[None], params.temperature, params.top_k, params.top_p, generator)[0])])
    while live:
        rows = sorted(live)
        budgets = [min(k, params.max_new_tokens - len(outs[r])) for r in rows]
        proposals = propose_all(draft, [prompts[r] + outs[r] for r in rows], rows, budgets, params, generator)
        width = 1 + max(len(p) for p, _ in proposals)
        starts = [int(engine.lengths[r]) for r in rows]
        stats.target_steps += 1
        if width == 1:  # nothing to verify: a plain step
            logits = engine.decode(torch.tensor(rows), torch.tensor([outs[r][-1] for r in rows]))
            picks = sample_next(logits, params.temperature, params.top_k, params.top_p, generator).tolist()
            for r, token in zip(rows, picks):
                emit(r, [token])
            continue
        fed = [[outs[r][-1]] + p + [p[-1] if p else outs[r][-1]] * (width - 1 - len(p)) for r, (p, _) in zip(rows, proposals)]
        scored = engine.extend(torch.tensor(rows), torch.tensor(fed))  # (B, width, V)
        for i, (r, (proposal, q)) in enumerate(zip(rows, proposals)):
            tokens, kept = accept(scored[i, :len(proposal) + 1], proposal, q, params, generator)
            stats.proposed += len(proposal)
            stats.accepted += kept
            engine.truncate(r, starts[i] + 1 + kept)  # the last token and the kept ones stay cached
            draft.rollback(len(prompts[r]) + len(outs[r]) + kept, slot=r)
            emit(r, tokens)
    n = max((len(o) for o in outs), default=0)
    return torch.tensor([o + [o[-1]] * (n - len(o)) if o else [] for o in outs], dtype=torch.long).reshape(b, n), stats
