"""The wire types of the OpenAI-compatible API (pydantic): requests, responses, stream chunks, errors.

Requests are validated strictly, as OpenAI's API does: a number where a number belongs (`"ten"`,
`true` or `1e30` for an integer are refused), ranges checked, token ids as integers. Fields OpenAI
defines that slimlm does not use (`user`, `presence_penalty`, ...) are accepted and ignored, and
`null` means the field's default. The schema is served at /openapi.json.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = Field(False, description="send a last chunk with the usage (and no choices) before [DONE]")


class GenerationRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    model: str | None = Field(None, description="a served model's name (default: the first one)")
    max_tokens: int = Field(16, ge=0, description="tokens to generate at most")
    max_completion_tokens: int | None = Field(None, ge=0, description="the newer name of max_tokens (wins if given)")
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy")
    top_p: float = Field(1.0, ge=0, le=1, description="nucleus sampling; 0 is greedy")
    top_k: int = Field(0, ge=0, description="0 is off")
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1], description="makes sampling reproducible")
    n: int = Field(1, ge=1, le=8, description="choices to generate")
    stop: str | list[str] = Field([], description="a string or up to 4 strings that end the text (not included)")
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description='with stream: {"include_usage": true} adds a usage chunk')
    response_format: dict[str, Any] | None = Field(
        None, description='{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": '
                          '{"name": ..., "schema": {...}}}: the output is then JSON (valid against the schema)')

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, stop: Any) -> list[str]:
        stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
        if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4):
            raise ValueError("must be a string or a list of up to 4 strings")
        return [s for s in stop if s]  # an empty stop string would end every text at once

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "GenerationRequest":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def new_tokens(self) -> int:
        return self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens


class CompletionRequest(GenerationRequest):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="text, a list of token ids, or a batch of either (a list of texts or of token-id lists)")
    logprobs: int | None = Field(None, ge=0, le=20, description="report the top N alternatives of each token")
    echo: bool = Field(False, description="prepend the prompt (with logprobs: score it, as evaluation harnesses do)")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, prompt: Any) -> Any:
        def ids(x: Any) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        batch = isinstance(prompt, list) and bool(prompt) and all(isinstance(p, str) or (ids(p) and p) for p in prompt)
        if not (isinstance(prompt, str) or ids(prompt) or batch):
            raise ValueError("must be a string, a list of token ids (integers), or a non-empty list of either")
        if batch and len(prompt) > 64:
            raise ValueError("a batch holds at most 64 prompts")
        return prompt

    @property
    def batched(self) -> bool:
        """A list of prompts (texts or token-id lists) rather than one."""
        return isinstance(self.prompt, list) and bool(self.prompt) and not isinstance(self.prompt[0], int)


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: str
    content: str


class ChatCompletionRequest(GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, description="the conversation so far")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Logprobs(BaseModel):
    """OpenAI's completions `logprobs`: each token's text, log-probability, top alternatives and offset."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


FinishReason = Literal["stop", "length"] | None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: Logprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    """What a chat stream chunk adds; fields left out are absent from the JSON, as OpenAI sends them."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None  # only in the last chunk, with stream_options.include_usage


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, and the last event of a stream that failed: {"error": {...}}."""

    error: ErrorBody


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "slimlm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "degraded", "shutting down"]
    models: list[str]
    replicas: dict[str, list[bool]] | None = None  # with --replicas: whether each replica serves


REQUEST_MODELS = (CompletionRequest, ChatCompletionRequest)
