"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, for every failure: bad
requests, unknown routes (404) and methods (405), and anything unexpected (500; the traceback goes
to the server's log, never to the client)."""

from __future__ import annotations

from pydantic import ValidationError

from slimlm.server.protocol import ErrorBody, ErrorResponse


class APIError(Exception):
    """An answer other than 200: the status, and what the client is told."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.kind, param=self.param, code=self.code))


def error_response(e: APIError):
    from fastapi.responses import JSONResponse

    return JSONResponse(e.body().model_dump(), status_code=e.status, headers=e.headers)


def from_validation(e: ValidationError) -> APIError:
    """A 400 naming the first offending field of a request body."""
    first = e.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first['msg'].removeprefix('Invalid JSON: ')}")
    if first["type"] == "model_type" and not first["loc"]:
        return APIError(400, "the body must be a JSON object")
    loc = [str(part) for part in first["loc"]]
    field = ".".join(loc)
    message = first["msg"].removeprefix("Value error, ")
    return APIError(400, f"'{field}': {message}" if field else message, param=loc[0] if loc else None)


def install(app) -> None:
    """Route every failure through error_response."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        return error_response(APIError(400, f"invalid request: {e.errors()[0].get('msg', 'bad value')}"))

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        if e.status_code == 404:
            message, code = f"no route {request.method} {request.url.path}", "not_found"
        elif e.status_code == 405:
            message, code = f"{request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            message, code = str(e.detail), None
        return error_response(APIError(e.status_code, message, code=code, headers=getattr(e, "headers", None)))

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):  # a bug in slimlm: Starlette re-raises it for uvicorn to log
        return error_response(APIError(500, f"internal error: {type(e).__name__}", kind="server_error"))
