"""What the app serves and how: its settings, the served models, and the state handlers share."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from typing import Any

from slimlm.core.errors import SlimError
from slimlm.server.errors import APIError
from slimlm.server.scheduler import Scheduler


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """Limits of the HTTP API. request_timeout 0 times every request out (tests use it)."""

    api_key: str | None = None
    max_tokens_limit: int = 2048  # the most a request may ask for
    max_request_bytes: int = 1 << 20
    request_timeout: float = 600.0  # seconds from submission
    retry_after: int = 1  # seconds, with 429
    shutdown_grace: float = 5.0  # seconds in-flight requests may take to finish after SIGTERM/SIGINT

    def __post_init__(self) -> None:
        def integer(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        for name in ("max_tokens_limit", "max_request_bytes", "retry_after"):
            if not integer(getattr(self, name)) or getattr(self, name) < 1:
                raise SlimError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("request_timeout", "shutdown_grace"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise SlimError(f"{name} must be a number of seconds >= 0, got {value!r}")
        key = self.api_key
        if key is not None and (not key or not key.isascii() or not key.isprintable() or " " in key):
            raise SlimError("the API key must be printable ASCII without spaces (it travels in an HTTP header)")


@dataclasses.dataclass
class ServedModel:
    name: str
    model: Any
    tokenizer: Any
    scheduler: Scheduler


@dataclasses.dataclass
class ServerState:
    """Shared by every handler (as `app.state.slimlm`)."""

    models: dict[str, ServedModel]
    settings: ServeSettings
    metrics: Any
    tasks: set[asyncio.Task] = dataclasses.field(default_factory=set)  # background tasks, kept referenced

    def model(self, name: str | None) -> ServedModel:
        name = name or next(iter(self.models))
        if name not in self.models:
            raise APIError(404, f"model '{name}' is not served; available: {', '.join(self.models)}", param="model",
                           code="model_not_found")
        return self.models[name]

    @property
    def shutting_down(self) -> bool:
        return any(m.scheduler.deadline is not None for m in self.models.values())

    def shutdown(self, grace: float) -> None:
        for m in self.models.values():
            m.scheduler.shutdown(grace)

    def background(self, coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task
