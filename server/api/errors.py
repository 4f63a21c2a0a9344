"""Every error the API returns, in OpenAI's envelope, made here and nowhere else:
``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}``.

What a client reads never locates the registry: a storage failure (its message names the bucket, the
endpoint or a folder) is a generic 503 and an integrity failure a generic 500, their detail logged
here; any other message has URIs (``s3://...``, ``file:///...``, ``http://...``) replaced before it leaves.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.adapters.errors import IntegrityError, LoraplexError, NotFoundError, StorageError

log = logging.getLogger("loraplex.api")

STORAGE_MESSAGE = "the adapter registry is unavailable; retry later"
INTEGRITY_MESSAGE = "stored adapter data failed verification; the operator has the details in the server log"
_URI_RE = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://\S*")


class OverloadedError(LoraplexError):
    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTooLargeError(LoraplexError):
    status = 413
    type = "invalid_request_error"


class TimeoutError_(LoraplexError):
    status = 504
    type = "timeout_error"


def envelope(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
             headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def scrub(message: str) -> str:
    """``message`` with every URI replaced (a registry's location is no client's business)."""
    return _URI_RE.sub("<registry>", message)


def from_exception(exc: Exception) -> JSONResponse:
    if isinstance(exc, OverloadedError):
        return envelope(exc.status, exc.message, exc.type, headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, StorageError):
        log.warning("registry storage failed: %s", exc.message)
        return envelope(503, STORAGE_MESSAGE, exc.type, headers={"Retry-After": "5"})
    if isinstance(exc, IntegrityError):
        log.error("stored adapter data failed verification: %s", exc.message)
        return envelope(500, INTEGRITY_MESSAGE, exc.type)
    if isinstance(exc, NotFoundError):
        return envelope(404, scrub(exc.message), exc.type, "model", "model_not_found")
    if isinstance(exc, LoraplexError):
        return envelope(exc.status, scrub(exc.message), exc.type, headers=getattr(exc, "headers", None))
    if isinstance(exc, ValueError):  # the engine's and SamplingParams' checks of a request
        message = scrub(str(exc).splitlines()[0]) if str(exc) else "invalid request"
        return envelope(400, message, "invalid_request_error")
    log.exception("internal error", exc_info=exc)
    return envelope(500, "internal server error", "server_error")


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return envelope(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "),
                            "invalid_request_error")
        if first.get("type") == "unsupported_field":  # (unserved.py: a field of the schemas not served here)
            return envelope(400, first["msg"], "invalid_request_error", first["ctx"]["field"])
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        msg = first.get("msg", "invalid request")
        return envelope(400, f"{where}: {msg}" if where else msg, "invalid_request_error", where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return envelope(exc.status_code, str(exc.detail), type_, headers=getattr(exc, "headers", None))

    async def _known(_: Request, exc: Exception) -> JSONResponse:
        return from_exception(exc)

    # Registered per class so Starlette's ExceptionMiddleware answers them (a handler for bare
    # Exception runs in ServerErrorMiddleware, which re-raises after answering).
    app.add_exception_handler(LoraplexError, _known)
    app.add_exception_handler(ValueError, _known)
    app.add_exception_handler(Exception, _known)
