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


def test_a_stop_string_inside_tokens_that_waited_cuts_the_text_and_the_usage_there():
    """Every token has arrived before the stream reads (so they would go out in one chunk); a stop string
    completed by the 5th token: the text ends before it and the usage counts 5 tokens, as `collect` does."""
    from slimlm.server.generation import collect

    tokenizer = tiny_tokenizer()
    tokens = tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"][:9]
    text = tokenizer.decode(tokens)
    upto = tokenizer.decode(tokens[:5])
    stop = upto[-2:] if upto[-2:].strip() else upto[-3:]
    assert stop not in tokenizer.decode(tokens[:4]) and stop in upto

    def request() -> Request:
        r = Request([1, 2], SamplingParams(max_new_tokens=len(tokens)), events=EventStream())
        for t in tokens:
            r.events.put(("token", t, None))
        r.events.put(("done", "length", None))
        return r

    async def main():
        r = request()
        await asyncio.sleep(0)
        events = [e async for e in stream(Reply("completion", "m"), tokenizer, [r], [stop], usage=True)]
        r2 = request()
        await asyncio.sleep(0)
        whole = await collect(tokenizer, r2, [stop])
        return [json.loads(e[6:]) for e in events if e.startswith("data: {")], whole

    chunks, whole = asyncio.run(main())
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == text[:text.find(stop)] == whole.text
    assert chunks[-1]["usage"]["completion_tokens"] == 5 == whole.count


def test_text_that_may_begin_a_stop_string_is_held_back_until_it_does_not():
    """A stop string that starts in one token and ends in the next: the text ends before it even when the
    tokens come one at a time (the first token's end was held back, not sent); without a stop string
    nothing is held back."""
    from slimlm.server.generation import collect

    tokenizer = tiny_tokenizer()
    tokens = tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"][:9]
    texts = [tokenizer.decode(tokens[:i]) for i in range(len(tokens) + 1)]
    i = next(i for i in range(2, len(tokens)) if len(texts[i]) - len(texts[i - 1]) >= 2)  # a token of 2+ chars
    stop = texts[i - 1][-1] + texts[i][len(texts[i - 1])]  # its first character joined to the text before it
    want = texts[-1][:texts[-1].find(stop)]

    async def main(stops):
        r = Request([1, 2], SamplingParams(max_new_tokens=len(tokens)), events=EventStream())
        for t in tokens:
            r.events.put(("token", t, None))
        r.events.put(("done", "length", None))
        await asyncio.sleep(0)
        return await collect(tokenizer, r, stops)  # one delta per token

    got = asyncio.run(main([stop]))
    assert got.text == want and got.finish == "stop"
    assert asyncio.run(main([])).text == texts[-1]
