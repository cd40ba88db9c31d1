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
import json
import threading
import time
import uuid
import weakref
from typing import AsyncIterator, Literal

from slimlm.core.errors import SlimError
from slimlm.engine.sampling import SamplingParams
from slimlm.server.errors import APIError
from slimlm.server.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                                    ChatCompletionResponse, ChatDelta, CompletionChoice, CompletionResponse,
                                    Logprobs, Usage)
from slimlm.server.scheduler import QueueFull, Request, ShuttingDown
from slimlm.server.state import ServedModel, ServerState

_MARK = "slimlm-text-8f3a1c"  # stands for the text in a chunk's template (`Reply.text_event`)

# finish reasons of the scheduler that end a request with an error: (HTTP status, OpenAI error type)
FAILURES = {"error": (500, "server_error"), "timeout": (504, "timeout_error"), "shutdown": (503, "server_error")}


class _Mailbox:
    """Events bound for one event loop from other threads, handed over in batches: the first event
    after a hand-over schedules one callback (a wake-up of the loop, a system call), and every event
    put before it runs goes with it. A decode step of 16 streams then wakes the loop once, not 16
    times."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.lock, self.items, self.scheduled = loop, threading.Lock(), [], False

    def put(self, queue: asyncio.Queue, event: tuple) -> None:
        with self.lock:
            self.items.append((queue, event))
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass

    def _deliver(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, event in items:  # in the order they were put
            queue.put_nowait(event)


_MAILBOXES: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox]" = weakref.WeakKeyDictionary()
_MAILBOXES_LOCK = threading.Lock()


class EventStream:
    """The asyncio end of a request's events: the scheduler thread puts, a handler awaits."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.held: tuple | None = None  # an event taken by `ready_token` that was not a token
        with _MAILBOXES_LOCK:
            self.mailbox = _MAILBOXES.get(self.loop) or _MAILBOXES.setdefault(self.loop, _Mailbox(self.loop))

    def put(self, event: tuple) -> None:
        self.mailbox.put(self.queue, event)

    async def get(self) -> tuple:
        if self.held is not None:
            event, self.held = self.held, None
            return event
        return await self.queue.get()

    def ready_token(self) -> tuple | None:
        """The next event if it has arrived and is a token, else None (without waiting or consuming
        anything else): a stream that lags behind its tokens sends those that wait in one chunk."""
        if self.held is not None or self.queue.empty():
            return None
        event = self.queue.get_nowait()
        if event[0] != "token":
            self.held = event
            return None
        return event


def start(state: ServerState, served: ServedModel, prompt: list[int], params: SamplingParams, n: int,
          request_id: str, constraint=None) -> list[Request]:
    """Submit one request per choice (choice i samples with seed + i); 429 when the queue is full.
    constraint: makes each choice's structured-output state (`structured.constraint_factory`)."""
    requests = []
    try:
        for i in range(n):
            seed = None if params.seed is None else params.seed + i
            r = Request(prompt=prompt, params=dataclasses.replace(params, seed=seed),
                        timeout=state.settings.request_timeout, id=request_id, events=EventStream(),
                        constraint=constraint() if constraint is not None else None)
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


class Detokenizer:
    """Text of a growing list of token ids, a delta per token, by decoding a short window rather than the
    whole list each time (the incremental scheme of vLLM's detokenizer): the window's text after its
    first token(s), which give the following tokens their spacing, is what the new token added. A
    token that ends in a half-decoded character adds nothing until the character completes."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.ids, self.prefix, self.read = tokenizer, [], 0, 0
        self.read_text = ""  # decode(ids[prefix:read])

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(token)
        new = self._decode(self.ids[self.prefix:])
        if len(new) <= len(self.read_text) or new.endswith("\ufffd"):
            return ""
        delta = new[len(self.read_text):]
        self.prefix, self.read = self.read, len(self.ids)
        self.read_text = self._decode(self.ids[self.prefix:self.read])
        return delta

    def rest(self) -> str:
        """What the tokens held back (an incomplete character at the end) decode to."""
        if self.read == len(self.ids):
            return ""
        return self._decode(self.ids[self.prefix:])[len(self.read_text):]


def _held_back(text: str, stop: list[str]) -> int:
    """How many characters at the end of `text` could be the beginning of a stop string (so must not go
    out yet: if the string completes, the text ends before it)."""
    for k in range(min(max(len(s) for s in stop) - 1, len(text)), 0, -1):
        tail = text[-k:]
        if any(len(s) > k and s.startswith(tail) for s in stop):
            return k
    return 0


async def pieces(tokenizer, r: Request, stop: list[str], coalesce: bool = False,
                 tally: list[int] | None = None) -> AsyncIterator[tuple[str, int | None, object]]:
    """Yield (text delta, token, logprob) as tokens arrive, then ('', None, finish_reason). Ends at a
    stop string (cut before it; text that could be the beginning of one is held back until it is not,
    as vLLM does, so streamed and whole replies end at the same place); raises APIError if the request
    failed, timed out or was shut down.
    coalesce: a delta takes every token that has already arrived (a stream behind its tokens sends
    them in one chunk; not with logprobs, which are per token); `token` is then the last of them.
    tally: [count], incremented for every token consumed, up to the one that completes a stop string
    (the usage's completion tokens, the same streamed or not)."""
    ready = getattr(r.events, "ready_token", None) if coalesce and not r.params.logprobs else None
    detok, longest = Detokenizer(tokenizer), max((len(s) for s in stop), default=0)
    text, sent = "", 0  # with stop strings: the text so far, and how much of it has gone out

    def find(begin: int) -> int:
        return min((at for at in (text.find(s, begin) for s in stop) if at >= 0), default=-1)

    while True:
        event = await r.events.get()
        if event[0] == "done":
            _, reason, message = event
            if reason in FAILURES:
                status, kind = FAILURES[reason]
                raise APIError(status, message or reason, kind=kind, code=reason)
            rest = detok.rest()  # a held-back character that never completed
            if stop:
                begin = max(0, len(text) - longest + 1)
                text += rest
                hit = find(begin)
                if hit >= 0:
                    if hit > sent:
                        yield text[sent:hit], None, None
                    yield "", None, "stop"
                    return
                rest = text[sent:]
            if rest:
                yield rest, None, None
            yield "", None, "length" if reason == "length" else "stop"
            return
        _, token, logprob = event
        if token in r.params.stop_ids:
            continue
        delta = ""
        while True:  # this token, then (coalescing) every token already waiting, one at a time
            piece = detok.add(token)
            if tally is not None:
                tally[0] += 1
            if stop:
                if piece:
                    begin = max(0, len(text) - longest + 1)  # a stop string may begin in earlier text
                    text += piece
                    hit = find(begin)
                    if hit >= 0:  # the text ends before it; the tokens after this one are not counted
                        r.cancel()
                        if hit > sent:
                            yield text[sent:hit], token, logprob
                        yield "", None, "stop"
                        return
            else:
                delta += piece
            waiting = ready() if ready is not None else None
            while waiting is not None and waiting[1] in r.params.stop_ids:
                waiting = ready()
            if waiting is None:
                break
            token = waiting[1]
        if stop:
            delta = text[sent:len(text) - _held_back(text, stop)]
            sent += len(delta)
        yield delta, token, logprob


@dataclasses.dataclass
class Choice:
    text: str
    tokens: list[int]
    logprobs: list
    finish: str
    count: int = 0  # completion tokens (`pieces`' tally)


async def collect(tokenizer, r: Request, stop: list[str]) -> Choice:
    out, tally = Choice("", [], [], "length"), [0]
    async for delta, token, extra in pieces(tokenizer, r, stop, tally=tally):
        if token is None and extra is not None:
            out.finish = extra
        else:
            out.text += delta
        if token is not None:
            out.tokens.append(token)
            out.logprobs.append(extra)
    out.count = tally[0]
    return out


async def collect_all(state: ServerState, http, tokenizer, requests: list[Request], stop: list[str]) -> list[Choice]:
    """Every choice, whole; failures become the APIError of the first that failed."""
    watch(state, http, requests)
    try:
        return list(await asyncio.gather(*(collect(tokenizer, r, stop) for r in requests)))
    finally:
        cancel_unfinished(requests)


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


@dataclasses.dataclass
class Reply:
    """The identity of one answer and the builder of its choices, responses and stream chunks."""

    kind: Literal["completion", "chat"]
    model: str
    id: str = ""
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    templates: dict = dataclasses.field(default_factory=dict, repr=False)  # choice index -> (head, tail)

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
        cls = CompletionResponse if self.kind == "completion" else ChatCompletionResponse
        return cls(id=self.id, created=self.created, model=self.model, choices=choices,
                   usage=_usage(prompt_tokens, completion_tokens))

    def event(self, choice) -> str:
        """A server-sent event carrying one chunk."""
        cls = CompletionResponse if self.kind == "completion" else ChatCompletionChunk
        chunk = cls(id=self.id, created=self.created, model=self.model, choices=[choice])
        return f"data: {chunk.model_dump_json(exclude={'usage'})}\n\n"

    def usage_event(self, prompt_tokens: int, completion_tokens: int) -> str:
        """The last chunk of a stream asked for its usage (`stream_options.include_usage`): no choices."""
        cls = CompletionResponse if self.kind == "completion" else ChatCompletionChunk
        chunk = cls(id=self.id, created=self.created, model=self.model, choices=[],
                    usage=_usage(prompt_tokens, completion_tokens))
        return f"data: {chunk.model_dump_json()}\n\n"

    def text_event(self, index: int, text: str) -> str:
        """`event(choice(index, text, None, chunk=True))`, the chunk of every token, from a template the
        models render once per choice: only the text changes, written by json.dumps (the same JSON
        value; pydantic per token cost more than the model's step on small models)."""
        if index not in self.templates:
            rendered = self.event(self.choice(index, _MARK, None, chunk=True))
            head, _, tail = rendered.partition(json.dumps(_MARK))
            self.templates[index] = (head, tail)
        head, tail = self.templates[index]
        return head + json.dumps(text, ensure_ascii=False) + tail


async def stream(reply: Reply, tokenizer, requests: list[Request], stop: list[str],
                 usage: bool = False) -> AsyncIterator[str]:
    """Server-sent events of every choice in turn, (usage: a chunk with the usage,) then [DONE]; a failure
    ends the stream with an error event ({"error": {...}}, which OpenAI's clients raise as an APIError)
    and [DONE]."""
    try:
        completion_tokens = 0
        for i, r in enumerate(requests):
            if reply.kind == "chat":
                yield reply.event(reply.choice(i, "", None, chunk=True, opening=True))
            # a chunk per token (or per run of tokens that arrived while the stream was busy), then the finish
            tally = [0]
            async for delta, token, extra in pieces(tokenizer, r, stop, coalesce=True, tally=tally):
                if token is None and extra is not None:
                    yield reply.event(reply.choice(i, delta, extra, chunk=True))
                else:
                    yield reply.text_event(i, delta)
            completion_tokens += tally[0]
        if usage:
            yield reply.usage_event(len(requests[0].prompt) if requests else 0, completion_tokens)
        yield "data: [DONE]\n\n"
    except APIError as e:
        yield f"data: {e.body().model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        cancel_unfinished(requests)
