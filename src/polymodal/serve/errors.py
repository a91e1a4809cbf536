"""Errors as the OpenAI API spells them: `{"error": {"message", "type", "param", "code"}}`, so the
`openai` client raises its own typed errors (UnprocessableEntityError, AuthenticationError, ...)
with our message. Every refusal says what was wrong in one line."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from polymodal.serve.batching import Overloaded

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         413: "request_too_large", 422: "invalid_request_error", 503: "server_overloaded"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def reason(e: BaseException) -> str:
    """An ImageError's message without the "<bytes, 3 bytes>: " that names an in-memory image."""
    message = str(e)
    return message.split(": ", 1)[1] if message.startswith("<") and ": " in message else message


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "server_error"), "param": param,
                      "code": status}}


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None):
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def _where(loc) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """pydantic's errors -> one line: 'messages[0].role: Input should be ...; k: ...'."""
    errors = exc.errors()
    # a union tries every member and reports each; the first error per location is enough
    seen, lines, first = set(), [], None
    for e in errors:
        loc = tuple(x for x in e.get("loc", ()) if not (isinstance(x, str) and ("[" in x or x in
                    ("str", "list", "int", "float", "function-after"))))
        where = _where(loc)
        if where in seen:
            continue
        seen.add(where)
        first = first or where
        msg = e.get("msg", "invalid")
        if e.get("type") == "json_invalid":
            msg = f"the body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})"
            where = "body"
        lines.append(f"{where}: {msg}")
    return "; ".join(lines[:5]) or "invalid request", first


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return error_response(422, message, param)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded):
        return error_response(503, str(exc), headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))
