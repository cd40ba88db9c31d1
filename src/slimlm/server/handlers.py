"""The route handlers. Each reads its validated body (`read_body`: the size limit holds for chunked
uploads too, enforced while the body streams in; pydantic's JSON parser refuses lone surrogates,
nesting past 200 levels and numbers out of range, all as 400s), tokenizes off the event loop,
checks the request against the model (token ids in the vocabulary, prompt + max_tokens within the
context) before it is admitted, and answers through `generation`."""

from __future__ import annotations

import asyncio
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request as HTTPRequest

from slimlm.core.errors import SlimError
from slimlm.engine.sampling import SamplingParams
from slimlm.server import generation
from slimlm.server.errors import APIError, from_validation
from slimlm.server.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                    CompletionResponse, Health, ModelCard, ModelList, GenerationRequest)
from slimlm.server.scheduler import ShuttingDown
from slimlm.server.scoring import logprobs_block, score_prompt
from slimlm.server.state import ServedModel, ServerState

Body = TypeVar("Body", bound=BaseModel)


def server_state(http: HTTPRequest) -> ServerState:
    return http.app.state.slimlm


async def read_body(http: HTTPRequest, model: type[Body], limit: int) -> Body:
    """The request body as `model`: 413 past `limit` bytes (declared or streamed), 400 if invalid."""
    from starlette.requests import ClientDisconnect

    too_large = APIError(413, f"the request body is over {limit} bytes", headers={"Connection": "close"})
    declared = http.headers.get("content-length", "")
    if declared.isdecimal() and int(declared) > limit:
        raise too_large
    body = bytearray()
    try:
        async for chunk in http.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:
        raise APIError(400, "the client went away while sending the body") from None
    try:
        return model.model_validate_json(bytes(body))
    except ValidationError as e:
        raise from_validation(e) from None


async def prompt_ids(served: ServedModel, prompt: str | list[int], special: bool = True) -> list[int]:
    """Token ids of a prompt, checked against the vocabulary. Text gets the tokenizer's special tokens
    (BOS), as vLLM does; a chat template already holds them (special=False). Tokenizing runs in a
    worker thread, so a long prompt never stalls other clients."""
    if isinstance(prompt, str):
        prompt = (await asyncio.to_thread(served.tokenizer, prompt, add_special_tokens=special))["input_ids"]
    vocab = served.scheduler.vocab_size
    bad = next((t for t in prompt if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param="prompt")
    if not prompt:
        raise APIError(400, "the prompt is empty", param="prompt")
    return prompt


def sampling_params(state: ServerState, served: ServedModel, body: GenerationRequest, prompt: list[int],
                    logprobs: int = 0) -> SamplingParams:
    max_tokens = body.new_tokens
    if max_tokens > state.settings.max_tokens_limit:
        raise APIError(400, f"'max_tokens' must be at most {state.settings.max_tokens_limit}, got {max_tokens}",
                       param="max_tokens")
    context = served.scheduler.max_len - 1
    if len(prompt) + max_tokens > context:
        raise APIError(400, f"this model's context is {context} tokens; the prompt has {len(prompt)} and max_tokens "
                       f"is {max_tokens}: shorten the prompt or lower max_tokens", param="max_tokens")
    eos = served.tokenizer.eos_token_id
    greedy = body.temperature == 0 or body.top_p == 0
    return SamplingParams(max_new_tokens=max_tokens, temperature=0.0 if greedy else body.temperature,
                          top_k=body.top_k, top_p=body.top_p or 1.0, seed=body.seed,
                          stop_ids=(eos,) if eos is not None else (), logprobs=logprobs)


async def constraint(served: ServedModel, body: GenerationRequest):
    """The per-choice structured-output state maker of the request's response_format, or None."""
    if not body.response_format:
        return None
    from slimlm.server.structured import constraint_factory, grammar_for

    try:
        grammar = grammar_for(body.response_format)
        if grammar is None:
            return None
        vocab = served.scheduler.vocab_size
        return await asyncio.to_thread(constraint_factory, grammar, served.tokenizer, vocab)
    except SlimError as e:
        raise APIError(400, str(e), param="response_format") from None


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The tokenizer's chat template, or a plain 'role: content' transcript when it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


async def score(served: ServedModel, prompt: list[int], top_n: int) -> list:
    """Prompt scoring on the scheduler's thread (it owns the model), awaited without blocking."""
    try:
        return await asyncio.wrap_future(served.scheduler.call(score_prompt, served.model, prompt, top_n))
    except ShuttingDown:
        raise APIError(503, "the server is shutting down", kind="server_error") from None


async def completions(http: HTTPRequest):
    """Continue a prompt (text or token ids) or a batch of them (OpenAI's list of strings or of token-id
    lists: choices p·n .. p·n + n - 1 answer prompt p, as evaluation harnesses expect); with echo +
    logprobs and max_tokens 0, score them."""
    state = server_state(http)
    body = await read_body(http, CompletionRequest, state.settings.max_request_bytes)
    served = state.model(body.model)
    reply = generation.Reply("completion", served.name)
    if not body.batched:
        return await complete_one(http, state, served, body, body.prompt, reply)
    if body.stream:
        raise APIError(400, "stream one prompt at a time (a batch of prompts cannot be streamed)", param="stream")
    parts = await asyncio.gather(*(complete_one(http, state, served, body, p, reply, k * body.n)
                                   for k, p in enumerate(body.prompt)))
    choices = [c for part in parts for c in part.choices]
    usage = [(part.usage.prompt_tokens, part.usage.completion_tokens) for part in parts]
    return reply.response(choices, sum(u[0] for u in usage), sum(u[1] for u in usage))


async def complete_one(http: HTTPRequest, state: ServerState, served: ServedModel, body: CompletionRequest,
                       prompt_spec: str | list[int], reply, first: int = 0):
    """One prompt's response (its choices numbered from `first`), or its stream."""
    tok = served.tokenizer
    prompt = await prompt_ids(served, prompt_spec)
    want_logprobs = body.logprobs is not None
    params = sampling_params(state, served, body, prompt, max(body.logprobs or 0, 1) if want_logprobs else 0)
    scored = body.echo and want_logprobs and not (body.stream and params.max_new_tokens)  # streams carry no logprobs
    scores = await score(served, prompt, body.logprobs or 0) if scored else None
    head = tok.decode(prompt) if body.echo else ""
    if params.max_new_tokens == 0:  # scoring only (evaluation harnesses): echo the prompt
        if not body.echo:
            raise APIError(400, "max_tokens 0 needs echo: true", param="max_tokens")
        logprobs = logprobs_block(tok, prompt, scores) if want_logprobs else None
        return reply.response([reply.choice(first + i, head, "length", logprobs) for i in range(body.n)],
                              len(prompt), 0)
    requests = generation.start(state, served, prompt, params, body.n, reply.id, await constraint(served, body))
    if body.stream:
        return _event_stream(state, http, reply, tok, requests, body)
    choices = await generation.collect_all(state, http, tok, requests, body.stop)
    out = []
    for i, c in enumerate(choices):
        logprobs = None
        if want_logprobs:
            logprobs = logprobs_block(tok, (prompt if body.echo else []) + c.tokens,
                                      (scores if body.echo else []) + c.logprobs)
        out.append(reply.choice(first + i, head + c.text, c.finish, logprobs))
    return reply.response(out, len(prompt), sum(c.count for c in choices))


async def chat(http: HTTPRequest):
    """Answer a conversation, rendered with the tokenizer's chat template (a plain transcript without one)."""
    state = server_state(http)
    body = await read_body(http, ChatCompletionRequest, state.settings.max_request_bytes)
    served = state.model(body.model)
    from jinja2 import TemplateError

    messages = [{"role": m.role, "content": m.content} for m in body.messages]
    template = bool(getattr(served.tokenizer, "chat_template", None))
    try:
        text = await asyncio.to_thread(chat_prompt, served.tokenizer, messages)
    except TemplateError as e:
        raise APIError(400, f"the model's chat template refused these messages: {e}", param="messages") from None
    prompt = await prompt_ids(served, text, special=not template)
    params = sampling_params(state, served, body, prompt)
    if params.max_new_tokens == 0:
        raise APIError(400, "max_tokens must be at least 1", param="max_tokens")
    reply = generation.Reply("chat", served.name)
    requests = generation.start(state, served, prompt, params, body.n, reply.id, await constraint(served, body))
    if body.stream:
        return _event_stream(state, http, reply, served.tokenizer, requests, body)
    choices = await generation.collect_all(state, http, served.tokenizer, requests, body.stop)
    return reply.response([reply.choice(i, c.text, c.finish) for i, c in enumerate(choices)], len(prompt),
                          sum(c.count for c in choices))


def _event_stream(state: ServerState, http: HTTPRequest, reply, tokenizer, requests, body):
    from fastapi.responses import StreamingResponse

    generation.watch(state, http, requests)
    usage = body.stream_options is not None and body.stream_options.include_usage
    return StreamingResponse(generation.stream(reply, tokenizer, requests, body.stop, usage),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def health(http: HTTPRequest) -> Health:
    """200 while serving; 503 once shutting down. Needs no API key."""
    state = server_state(http)
    if state.shutting_down:
        raise APIError(503, "the server is shutting down", kind="server_error")
    replicas = {name: m.scheduler.health() for name, m in state.models.items() if hasattr(m.scheduler, "health")}
    if any(not any(up) for up in replicas.values()):
        raise APIError(503, "every replica of a model has stopped: " + ", ".join(
            name for name, up in replicas.items() if not any(up)), kind="server_error")
    degraded = any(not all(up) for up in replicas.values())
    return Health(status="degraded" if degraded else "ok", models=list(state.models), replicas=replicas or None)


async def list_models(http: HTTPRequest) -> ModelList:
    """The served models."""
    return ModelList(data=[ModelCard(id=name) for name in server_state(http).models])


async def metrics(http: HTTPRequest):
    """Prometheus metrics."""
    from fastapi.responses import PlainTextResponse

    state = server_state(http)
    for served in state.models.values():
        state.metrics.observe_batch(None, served.scheduler.stats(), served.name)
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")


RESPONSES = {completions: CompletionResponse, chat: ChatCompletionResponse}
