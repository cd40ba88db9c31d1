"""Next-token selection: greedy, temperature, top-k and top-p (nucleus, Holtzman et al., arXiv 1904.09751)."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from slimlm.core.config import field
from slimlm.core.errors import SlimError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens: the one type shared by `generate`, the server's requests,
    its scheduler and the engine. temperature 0 is greedy; top_k 0 and top_p 1 are off; stop_ids end
    the sequence (the stop token is produced, then generation stops); logprobs N > 0 asks for each
    token's log-probability and the N most likely alternatives (the server's `logprobs`)."""

    max_new_tokens: int = field(64, "tokens to generate at most", short="-n")
    temperature: float = field(0.0, "softmax temperature; 0 is greedy")
    top_k: int = field(0, "sample among the k most likely tokens (0: off)")
    top_p: float = field(1.0, "sample from the smallest set of tokens whose probability reaches p (1: off)")
    seed: int | None = field(None, "seed of the sampling (reproducible output)")
    stop_ids: tuple[int, ...] = field((), "token ids that end the sequence (default: the model's EOS)", cli=False)
    logprobs: int = field(0, "report the N most likely alternatives of each token", cli=False)

    def __post_init__(self) -> None:
        def integer(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        if not integer(self.max_new_tokens) or self.max_new_tokens < 0:
            raise SlimError(f"max_new_tokens {self.max_new_tokens!r} must be a non-negative integer")
        if not number(self.temperature) or self.temperature < 0:
            raise SlimError(f"temperature {self.temperature!r} must be a finite number >= 0 (0 is greedy)")
        if not integer(self.top_k) or self.top_k < 0:
            raise SlimError(f"top_k {self.top_k!r} must be an integer >= 0 (0 is off)")
        if not number(self.top_p) or not 0 < self.top_p <= 1:
            raise SlimError(f"top_p {self.top_p!r} must be in (0, 1]")
        if self.seed is not None and not integer(self.seed):
            raise SlimError(f"seed {self.seed!r} must be an integer")
        if not integer(self.logprobs) or self.logprobs < 0:
            raise SlimError(f"logprobs {self.logprobs!r} must be an integer >= 0")
        object.__setattr__(self, "stop_ids", tuple(int(t) for t in self.stop_ids))


def sample_next(
    logits: Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """Token ids (B,) from last-position logits (B, V). temperature 0 means greedy.

    Numerically robust for any temperature > 0 and any logits: each row is shifted so its largest
    logit is 0 before dividing by the temperature (a tiny temperature such as 1e-40 then gives -inf,
    never inf - inf = NaN, and tends to greedy as it should); NaN logits never win; a row whose
    largest logit is not finite (all -inf, or +inf) falls back to the argmax. A generator on another
    device than the logits (a CPU generator with CUDA logits) samples on the generator's device.
    """
    scores = logits.float()
    scores = scores.masked_fill(scores.isnan(), float("-inf"))  # (B, V)
    greedy = scores.argmax(-1)  # (B,)
    if temperature <= 0:
        return greedy
    probs, finite = _sampling_probs(scores, temperature, top_k, top_p)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    sampled = torch.multinomial(probs, 1, generator=generator)[:, 0].to(greedy.device)
    return torch.where(finite[:, 0], sampled, greedy)


def sampling_probs(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """The distribution (B, V) `sample_next` draws from (temperature > 0; a row without a finite
    maximum puts all its mass on its argmax, which `sample_next` returns for it). Speculative decoding
    compares the target's and the draft's."""
    scores = logits.float()
    scores = scores.masked_fill(scores.isnan(), float("-inf"))
    probs, finite = _sampling_probs(scores, temperature, top_k, top_p)
    point = torch.nn.functional.one_hot(scores.argmax(-1), scores.shape[-1]).to(probs.dtype)
    return torch.where(finite, probs, point)


def _sampling_probs(scores: Tensor, temperature: float, top_k: int, top_p: float) -> tuple[Tensor, Tensor]:
    """(probs (B, V), finite (B, 1)): scores (B, V) without NaN -> the tempered, truncated softmax."""
    top = scores.max(-1, keepdim=True).values  # (B, 1)
    finite = torch.isfinite(top)
    f32 = torch.finfo(torch.float32)
    inverse = min(max(1.0 / max(temperature, 1e-300), f32.tiny), f32.max)  # 1 / temperature, a finite float32
    scores = (scores - torch.where(finite, top, 0.0)) * inverse  # (B, V), <= 0 with a 0 at each row's maximum
    scores = torch.where(finite, scores, 0.0)  # rows without a finite maximum: greedy below
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)  # (B, V)
        probs = sorted_scores.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p (never the first)
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    return scores.softmax(-1), finite  # well defined: every row keeps a 0 score (its maximum)
