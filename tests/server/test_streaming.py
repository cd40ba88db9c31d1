"""Streaming: a stream that lags behind its tokens sends the ones already waiting in one chunk, with
the same text as one chunk per token; logprobs streams stay one token per chunk."""

import asyncio
import json

from slimlm.engine.sampling import SamplingParams
from slimlm.server.generation import EventStream, Reply, stream
from slimlm.server.scheduler import Request
from slimlm.testing import tiny_tokenizer


def chunks(tokens: list[int], logprobs: int = 0) -> list[str]:
    """The texts of a completion stream's chunks when all of `tokens` have arrived before it reads."""
    tokenizer = tiny_tokenizer()

    async def main() -> list[str]:
        r = Request([1, 2], SamplingParams(max_new_tokens=len(tokens), logprobs=logprobs), events=EventStream())
        for t in tokens:
            r.events.put(("token", t, (0.0, []) if logprobs else None))
        r.events.put(("done", "length", None))
        await asyncio.sleep(0)  # the mailbox hands the events over
        out = []
        async for event in stream(Reply("completion", "m"), tokenizer, [r], []):
            if event.startswith("data: {"):
                out.append(json.loads(event[6:])["choices"][0]["text"])
        return out

    return asyncio.run(main())


def test_tokens_that_already_arrived_go_out_in_one_chunk_with_the_same_text():
    tokenizer = tiny_tokenizer()
    tokens = tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"][:8]
    coalesced = chunks(tokens)
    assert "".join(coalesced) == tokenizer.decode(tokens)
    assert len(coalesced) < len(tokens)  # fewer writes than tokens
    assert len(chunks(tokens, logprobs=1)) >= len(tokens)  # logprobs: a chunk per token
