"""An OpenAI-compatible HTTP API over the continuous-batching scheduler (FastAPI + uvicorn).

Routes: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as server-sent
events), GET /v1/models, GET|HEAD /health, GET /metrics (Prometheus), GET /openapi.json (the
schema, for clients and fuzzers; the docs pages are off). Errors use OpenAI's JSON shape
{"error": {"message", "type", "param", "code"}} with the matching status, 404 and 405 included;
the server keeps serving after any bad request. An API key, when set, is required on every route
but /health.
"""

from __future__ import annotations

import secrets

from slimlm.server import errors, handlers
from slimlm.server.errors import APIError, error_response
from slimlm.server.metrics import Metrics
from slimlm.server.protocol import REQUEST_MODELS, ErrorResponse
from slimlm.server.state import ServedModel, ServerState, ServeSettings

__all__ = ["ServeSettings", "ServedModel", "create_app"]


class RequireKey:
    """ASGI middleware: `Authorization: Bearer KEY` on every route but /health (401 otherwise; 400
    for a header that is not ASCII, which no key can match)."""

    def __init__(self, app, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
            problem = None
            if not given.isascii():
                problem = APIError(400, "the Authorization header must be ASCII ('Bearer KEY')", param="authorization")
            elif not secrets.compare_digest(given, self.expected):
                problem = APIError(401, "invalid or missing API key (Authorization: Bearer ...)",
                                   kind="authentication_error", code="invalid_api_key")
            if problem is not None:
                await error_response(problem)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _body_schema(model) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _openapi(app) -> dict:
    """FastAPI's schema plus the request bodies, which handlers read themselves (to bound their size)."""
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema

    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _, defs = models_json_schema([(m, "validation") for m in REQUEST_MODELS],
                                     ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(models: dict[str, ServedModel], settings: ServeSettings, metrics: Metrics):
    from fastapi import FastAPI

    from slimlm import __version__

    app = FastAPI(title="slimlm", version=__version__, description=__doc__.split("\n\n")[1], docs_url=None,
                  redoc_url=None)
    app.state.slimlm = ServerState(models, settings, metrics)
    errors.install(app)
    failures = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503, 504)}
    for path, handler, body in (("/v1/completions", handlers.completions, REQUEST_MODELS[0]),
                                ("/v1/chat/completions", handlers.chat, REQUEST_MODELS[1])):
        app.add_api_route(path, handler, methods=["POST"], response_model=handlers.RESPONSES[handler],
                          responses={**failures, 200: {"content": {"text/event-stream": {}}}},
                          openapi_extra=_body_schema(body))
    app.add_api_route("/v1/models", handlers.list_models, methods=["GET"], responses=failures)
    app.add_api_route("/health", handlers.health, methods=["GET"], responses={503: {"model": ErrorResponse}})
    app.add_api_route("/health", handlers.health, methods=["HEAD"], include_in_schema=False)
    app.add_api_route("/metrics", handlers.metrics, methods=["GET"], include_in_schema=False)
    app.openapi = lambda: _openapi(app)
    if settings.api_key:
        app.add_middleware(RequireKey, key=settings.api_key)
    return app
