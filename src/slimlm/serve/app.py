"""An OpenAI-compatible HTTP API over the continuous-batching scheduler (FastAPI + uvicorn).

Routes: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as server-sent
events), GET /v1/models, GET /health, GET /metrics (Prometheus). Errors use OpenAI's JSON shape
{"error": {"message", "type", "param", "code"}} with the matching status; the server keeps serving
after any bad request. An API key, when set, is required on every route but /health.
"""


import asyncio
import dataclasses
import json
import secrets
import time
import uuid
from typing import Any

from slimlm.core.errors import SlimError
from slimlm.serve.metrics import Metrics
from slimlm.serve.scheduler import QueueFull, Request, Scheduler


@dataclasses.dataclass
class ServeSettings:
    api_key: str | None = None
    max_tokens_limit: int = 2048  # the most a request may ask for
    max_request_bytes: int = 1 << 20
    request_timeout: float = 600.0
    retry_after: int = 1  # seconds, with 429


@dataclasses.dataclass
class ServedModel:
    name: str
    model: Any
    tokenizer: Any
    scheduler: Scheduler


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code, self.headers = status, message, kind, param, code, headers


def _check(condition: bool, message: str, param: str | None = None) -> None:
    if not condition:
        raise APIError(400, message, param=param)


def _number(body: dict, key: str, default, kind=(int, float), low=None, high=None):
    value = body.get(key, default)
    if value is None:
        return default
    _check(isinstance(value, kind) and not isinstance(value, bool), f"'{key}' must be a number", key)
    _check((low is None or value >= low) and (high is None or value <= high),
           f"'{key}' must be in [{low}, {high}], got {value}", key)
    return value


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The tokenizer's chat template, or a plain 'role: content' transcript when it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def create_app(models: dict[str, ServedModel], settings: ServeSettings, metrics: Metrics):
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    app = FastAPI(title="slimlm", docs_url=None, redoc_url=None)

    def error_response(e: APIError) -> JSONResponse:
        return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}},
                            status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e):
        return error_response(APIError(422, f"invalid request: {e.errors()[0].get('msg', 'bad value')}"))

    @app.exception_handler(Exception)
    async def _unexpected(request, e):  # never a traceback to the client; the server keeps serving
        return error_response(APIError(500, f"internal error: {type(e).__name__}", kind="server_error"))

    @app.middleware("http")
    async def _guard(request: HTTPRequest, call_next):
        if settings.api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given, f"Bearer {settings.api_key}"):
                return error_response(APIError(401, "invalid or missing API key (Authorization: Bearer ...)",
                                               kind="authentication_error", code="invalid_api_key"))
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > settings.max_request_bytes:
            return error_response(APIError(413, f"request body over {settings.max_request_bytes} bytes"))
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(models)}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "slimlm"}
                                           for name in models]}

    @app.get("/metrics")
    async def get_metrics():
        for served in models.values():
            metrics.observe_batch(None, served.scheduler.stats(), served.name)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    async def parse(request: HTTPRequest) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the body is not valid JSON") from None
        _check(isinstance(body, dict), "the body must be a JSON object")
        return body

    def resolve(body: dict) -> ServedModel:
        name = body.get("model") or next(iter(models))
        if name not in models:
            raise APIError(404, f"model '{name}' is not served; available: {', '.join(models)}", param="model",
                           code="model_not_found")
        return models[name]

    def sampling(body: dict, served: ServedModel, prompt: list[int]) -> dict:
        max_tokens = _number(body, "max_tokens", 16, int, 0, settings.max_tokens_limit)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        _check(isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4,
               "'stop' must be a string or a list of up to 4 strings", "stop")
        n = _number(body, "n", 1, int, 1, 8)
        context = served.scheduler.max_len - 1
        _check(len(prompt) + max_tokens <= context, f"this model's context is {context} tokens; the prompt has "
               f"{len(prompt)} and max_tokens is {max_tokens}: shorten the prompt or lower max_tokens", "max_tokens")
        return dict(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, low=0, high=2),
                    top_p=_number(body, "top_p", 1.0, low=0, high=1), top_k=_number(body, "top_k", 0, int, 0),
                    seed=_number(body, "seed", None, int), stop=stop, n=n)

    def start(served: ServedModel, prompt: list[int], opts: dict, index: int, logprobs: int) -> Request:
        eos = served.tokenizer.eos_token_id
        seed = None if opts["seed"] is None else opts["seed"] + index
        r = Request(prompt=prompt, max_tokens=opts["max_tokens"], temperature=opts["temperature"], top_p=opts["top_p"],
                    top_k=opts["top_k"], seed=seed, stop_ids=frozenset([eos] if eos is not None else []),
                    logprobs=logprobs, timeout=settings.request_timeout)
        try:
            return served.scheduler.submit(r)
        except QueueFull:
            raise APIError(429, "the server is busy (request queue full); retry shortly", kind="rate_limit_error",
                           headers={"Retry-After": str(settings.retry_after)}) from None
        except SlimError as e:
            raise APIError(400, str(e)) from None

    async def pieces(served: ServedModel, r: Request, stop: list[str], http: HTTPRequest):
        """Yield (text delta, token, logprob) as tokens arrive, then ('', None, finish_reason). Stops at a
        stop string (cut before it) and cancels the request if the client goes away."""
        finished = False
        try:
            async for item in _pieces_loop(r, stop, http, served.tokenizer, asyncio.get_running_loop()):
                if item[1] is None:
                    finished = True
                yield item
        finally:
            if not finished:  # the consumer went away (client disconnect, stream closed): free the slot now
                r.cancel()

    async def _pieces_loop(r: Request, stop: list[str], http: HTTPRequest, tok, loop):
        text, ids, emitted = "", [], 0
        checked = time.monotonic()
        while True:
            if time.monotonic() - checked > 0.25:  # even while tokens flow, notice a client that left
                checked = time.monotonic()
                if await http.is_disconnected():
                    return
            try:
                event = await loop.run_in_executor(None, r.events.get, True, 0.25)
            except Exception:  # queue.Empty: nothing yet
                continue
            if event[0] == "done":
                if event[1] == "error":
                    raise APIError(500, event[2] or "generation failed", kind="server_error")
                if event[1] == "timeout":
                    raise APIError(504, f"the request took longer than {settings.request_timeout:g} s",
                                   kind="timeout_error")
                yield "", None, {"stop": "stop", "length": "length", "timeout": "length"}.get(event[1], event[1])
                return
            _, token, logprob = event
            if token in r.stop_ids:
                continue
            ids.append(token)
            text = tok.decode(ids, skip_special_tokens=True)
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

    def encode(served: ServedModel, prompt, special: bool = True) -> list[int]:
        """Token ids of a prompt: text gets the tokenizer's special tokens (BOS), as vLLM does; a chat
        template already holds them (special=False)."""
        if isinstance(prompt, str):
            return served.tokenizer(prompt, add_special_tokens=special)["input_ids"]
        _check(isinstance(prompt, list) and all(isinstance(t, int) for t in prompt), "'prompt' must be a string or "
               "a list of token ids", "prompt")
        return prompt

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        body = await parse(http)
        served = resolve(body)
        _check("prompt" in body, "'prompt' is required", "prompt")
        prompt = encode(served, body["prompt"])
        _check(len(prompt) > 0, "the prompt is empty", "prompt")
        opts = sampling(body, served, prompt)
        top_n = _number(body, "logprobs", None, int, 0, 20)
        want_logprobs = top_n is not None
        echo = bool(body.get("echo", False))
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        prompt_scores = _score_prompt(served, prompt, top_n or 0) if (echo and want_logprobs) else None
        if opts["max_tokens"] == 0:  # scoring only (evaluation harnesses): echo the prompt
            _check(echo, "max_tokens 0 needs echo: true", "max_tokens")
            choice = {"index": 0, "text": served.tokenizer.decode(prompt), "finish_reason": "length",
                      "logprobs": _logprobs_block(served, prompt, prompt_scores) if want_logprobs else None}
            return {"id": cid, "object": "text_completion", "created": created, "model": served.name,
                    "choices": [choice], "usage": {"prompt_tokens": len(prompt), "completion_tokens": 0,
                                                   "total_tokens": len(prompt)}}
        requests = [start(served, prompt, opts, i, max(top_n or 0, 1) if want_logprobs else 0) for i in range(opts["n"])]
        if body.get("stream"):
            async def events():
                for i, r in enumerate(requests):
                    async for delta, token, extra in pieces(served, r, opts["stop"], http):
                        finish = extra if token is None else None
                        chunk = {"id": cid, "object": "text_completion", "created": created, "model": served.name,
                                 "choices": [{"index": i, "text": delta, "finish_reason": finish, "logprobs": None}]}
                        yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        choices, completion_tokens = [], 0
        for i, r in enumerate(requests):
            text, tokens, lps, finish = "", [], [], "length"
            async for delta, token, extra in pieces(served, r, opts["stop"], http):
                if token is None:
                    finish = extra
                else:
                    text += delta
                    tokens.append(token)
                    lps.append(extra)
            completion_tokens += len(tokens)
            logprobs = None
            if want_logprobs:
                logprobs = _logprobs_block(served, (prompt if echo else []) + tokens,
                                           (prompt_scores or []) + lps if echo else lps)
            head = served.tokenizer.decode(prompt) if echo else ""
            choices.append({"index": i, "text": head + text, "finish_reason": finish, "logprobs": logprobs})
        return {"id": cid, "object": "text_completion", "created": created, "model": served.name, "choices": choices,
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
                          "total_tokens": len(prompt) + completion_tokens}}

    @app.post("/v1/chat/completions")
    async def chat(http: HTTPRequest):
        body = await parse(http)
        served = resolve(body)
        messages = body.get("messages")
        _check(isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages),
            "'messages' must be a non-empty list of {role, content} objects", "messages")
        prompt = encode(served, chat_prompt(served.tokenizer, messages),
                        special=not getattr(served.tokenizer, "chat_template", None))
        opts = sampling(body, served, prompt)
        _check(opts["max_tokens"] > 0, "max_tokens must be at least 1", "max_tokens")
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        requests = [start(served, prompt, opts, i, 0) for i in range(opts["n"])]
        if body.get("stream"):
            async def events():
                for i, r in enumerate(requests):
                    first = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": served.name,
                             "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
                    yield f"data: {json.dumps(first)}\n\n"
                    async for delta, token, extra in pieces(served, r, opts["stop"], http):
                        finish = extra if token is None else None
                        chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": served.name,
                                 "choices": [{"index": i, "delta": {"content": delta} if token is not None else {},
                                              "finish_reason": finish}]}
                        yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        choices, completion_tokens = [], 0
        for i, r in enumerate(requests):
            text, finish, count = "", "length", 0
            async for delta, token, extra in pieces(served, r, opts["stop"], http):
                if token is None:
                    finish = extra
                else:
                    text += delta
                    count += 1
            completion_tokens += count
            choices.append({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish})
        return {"id": cid, "object": "chat.completion", "created": created, "model": served.name, "choices": choices,
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
                          "total_tokens": len(prompt) + completion_tokens}}

    return app


def _score_prompt(served: ServedModel, prompt: list[int], top_n: int) -> list:
    """(log-probability, top alternatives) of each prompt token given the ones before it (None for the first)."""
    import torch

    with served.scheduler.model_lock, torch.no_grad():
        logits = served.model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)  # (T, V)
    out: list = [None]
    for i in range(1, len(prompt)):
        top = torch.topk(logits[i - 1], max(top_n, 1))
        out.append((float(logits[i - 1, prompt[i]]), list(zip(top.indices.tolist(), top.values.tolist()))))
    return out


def _logprobs_block(served: ServedModel, tokens: list[int], scores: list) -> dict:
    """OpenAI's completions `logprobs`: tokens, their log-probabilities, the top alternatives, offsets."""
    tok = served.tokenizer
    texts = [tok.decode([t]) for t in tokens]
    offsets, pos = [], 0
    for t in texts:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": texts, "token_logprobs": [s[0] if s else None for s in scores],
            "top_logprobs": [{tok.decode([t]): v for t, v in s[1]} if s else None for s in scores],
            "text_offset": offsets}
