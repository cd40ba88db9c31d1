"""From a validated request to the scheduler and back to the client, for completions and chat alike.

`start` submits one scheduler request per choice (`n`), with the one `SamplingParams` type the
engine uses. `pieces` turns a request's token events into text deltas (cut at stop strings, a
half-decoded character held back). `Reply` builds every choice, response and stream chunk of
either endpoint. `collect` gathers whole choices; `stream` sends server-sent events and, if the
request fails or times out mid-stream, an error event OpenAI's clients raise on, then `[DONE]`.
`watch` cancels a request as soon as its client hangs up, streaming or not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import AsyncIterator, Literal

from slimlm.core.errors import SlimError
from slimlm.engine.sampling import SamplingParams
from slimlm.server.errors import APIError
from slimlm.server.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                                    ChatCompletionResponse, ChatDelta, CompletionChoice, CompletionResponse,
                                    Logprobs, Usage)
from slimlm.server.scheduler import QueueFull, Request, ShuttingDown
from slimlm.server.state import ServedModel, ServerState

# finish reasons of the scheduler that end a request with an error: (HTTP status, OpenAI error type)
FAILURES = {"error": (500, "server_error"), "timeout": (504, "timeout_error"), "shutdown": (503, "server_error")}


class EventStream:
    """The asyncio end of a request's events: the scheduler thread puts, a handler awaits."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass

    async def get(self) -> tuple:
        return await self.queue.get()


def start(state: ServerState, served: ServedModel, prompt: list[int], params: SamplingParams, n: int,
          request_id: str) -> list[Request]:
    """Submit one request per choice (choice i samples with seed + i); 429 when the queue is full."""
    requests = []
    try:
        for i in range(n):
            seed = None if params.seed is None else params.seed + i
            r = Request(prompt=prompt, params=dataclasses.replace(params, seed=seed),
                        timeout=state.settings.request_timeout, id=request_id, events=EventStream())
            requests.append(served.scheduler.submit(r))
    except QueueFull:
        raise APIError(429, "the server is busy (request queue full); retry shortly", kind="rate_limit_error",
                       headers={"Retry-After": str(state.settings.retry_after)}) from None
    except ShuttingDown:
        raise APIError(503, "the server is shutting down", kind="server_error") from None
    except SlimError as e:
        raise APIError(400, str(e), param="prompt") from None
    finally:
        if len(requests) < n:  # some choices were refused: do not run the others for nobody
            for r in requests:
                r.cancel()
    return requests


def watch(state: ServerState, http, requests: list[Request]) -> None:
    """Cancel `requests` the moment the client of `http` hangs up. Once the body is read, the next
    ASGI message is http.disconnect, sent when the connection drops (or the response completes,
    when there is nothing left to cancel): waiting for it costs nothing and reacts at once."""

    async def wait_for_hangup() -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass
        cancel_unfinished(requests)

    state.background(wait_for_hangup())


def cancel_unfinished(requests: list[Request]) -> None:
    for r in requests:
        if r.finish_reason is None:
            r.cancel()


async def pieces(tokenizer, r: Request, stop: list[str]) -> AsyncIterator[tuple[str, int | None, object]]:
    """Yield (text delta, token, logprob) as tokens arrive, then ('', None, finish_reason). Ends at a
    stop string (cut before it); raises APIError if the request failed, timed out or was shut down."""
    text, ids, emitted = "", [], 0
    while True:
        event = await r.events.get()
        if event[0] == "done":
            _, reason, message = event
            if reason in FAILURES:
                status, kind = FAILURES[reason]
                raise APIError(status, message or reason, kind=kind, code=reason)
            if emitted < len(text):  # a held-back character that never completed
                yield text[emitted:], None, None
            yield "", None, "length" if reason == "length" else "stop"
            return
        _, token, logprob = event
        if token in r.params.stop_ids:
            continue
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        hit = min((text.find(s) for s in stop if s in text), default=-1)
        if hit >= 0:
            r.cancel()
            if hit > emitted:
                yield text[emitted:hit], token, logprob
            yield "", None, "stop"
            return
        safe = len(text) - (1 if text.endswith("\ufffd") else 0)  # hold back a half-decoded character
        delta, emitted = text[emitted:safe], max(emitted, safe)
        yield delta, token, logprob


@dataclasses.dataclass
class Choice:
    text: str
    tokens: list[int]
    logprobs: list
    finish: str


async def collect(tokenizer, r: Request, stop: list[str]) -> Choice:
    out = Choice("", [], [], "length")
    async for delta, token, extra in pieces(tokenizer, r, stop):
        if token is None and extra is not None:
            out.finish = extra
        else:
            out.text += delta
        if token is not None:
            out.tokens.append(token)
            out.logprobs.append(extra)
    return out


async def collect_all(state: ServerState, http, tokenizer, requests: list[Request], stop: list[str]) -> list[Choice]:
    """Every choice, whole; failures become the APIError of the first that failed."""
    watch(state, http, requests)
    try:
        return list(await asyncio.gather(*(collect(tokenizer, r, stop) for r in requests)))
    finally:
        cancel_unfinished(requests)


@dataclasses.dataclass
class Reply:
    """The identity of one answer and the builder of its choices, responses and stream chunks."""

    kind: Literal["completion", "chat"]
    model: str
    id: str = ""
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or f"{'cmpl' if self.kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex[:24]}"

    def choice(self, index: int, text: str, finish: str | None, logprobs: Logprobs | None = None, *,
               chunk: bool = False, opening: bool = False):
        """One choice, of a whole response or (chunk=True) of a stream chunk; opening: a chat stream's
        first chunk, which names the role."""
        if self.kind == "completion":
            return CompletionChoice(index=index, text=text, finish_reason=finish, logprobs=logprobs)
        if not chunk:
            return ChatChoice(index=index, message=AssistantMessage(content=text), finish_reason=finish)
        if opening:
            return ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""), finish_reason=None)
        delta = ChatDelta(content=text if finish is None else None)
        return ChatChunkChoice(index=index, delta=delta, finish_reason=finish)

    def response(self, choices: list, prompt_tokens: int, completion_tokens: int):
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                      total_tokens=prompt_tokens + completion_tokens)
        cls = CompletionResponse if self.kind == "completion" else ChatCompletionResponse
        return cls(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def event(self, choice) -> str:
        """A server-sent event carrying one chunk."""
        if self.kind == "completion":
            chunk = CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[choice])
            return f"data: {chunk.model_dump_json(exclude={'usage'})}\n\n"
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])
        return f"data: {chunk.model_dump_json()}\n\n"


async def stream(reply: Reply, tokenizer, requests: list[Request], stop: list[str]) -> AsyncIterator[str]:
    """Server-sent events of every choice in turn, then [DONE]; a failure ends the stream with an
    error event ({"error": {...}}, which OpenAI's clients raise as an APIError) and [DONE]."""
    try:
        for i, r in enumerate(requests):
            if reply.kind == "chat":
                yield reply.event(reply.choice(i, "", None, chunk=True, opening=True))
            async for delta, token, extra in pieces(tokenizer, r, stop):  # one chunk per token, then the finish
                yield reply.event(reply.choice(i, delta, extra if token is None else None, chunk=True))
        yield "data: [DONE]\n\n"
    except APIError as e:
        yield f"data: {e.body().model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        cancel_unfinished(requests)
