"""The FastAPI app factory: OpenAI-compatible endpoints over an ``EngineBackend``.

Request lifecycle: authenticate -> validate the body (pydantic) -> resolve ``model`` (or the
``adapters`` mixture / ``merge``) to pinned adapters -> admission (bounded queue, else 429) ->
stream tokens from the backend -> OpenAI-shaped body or SSE chunks. A client that disconnects
aborts its generation; every error leaves through ``errors.py``.

``create_app`` only wires: the error handlers, the body-size middleware, the shared state
(``state.ApiState``) and one router per endpoint group (``chat``, ``completions``, ``models``,
``admin``, ``health``).
"""

from __future__ import annotations

from fastapi import FastAPI

from . import admin, chat, completions, errors, health, models
from .admission import Admission
from .auth import KeyStore
from .backend import EngineBackend
from .errors import RequestTooLargeError
from .metrics import Metrics
from .resolver import Resolver
from .state import ApiState, RequestLimits

__all__ = ["BodyLimit", "RequestLimits", "create_app"]

ROUTERS = (chat.router, completions.router, models.router, admin.router, health.router)


def create_app(backend: EngineBackend, resolver: Resolver, *, keys: KeyStore, metrics: Metrics,
               limits: RequestLimits = RequestLimits()) -> FastAPI:
    """The API over ``backend``: requests resolved by ``resolver``, guarded by ``keys`` and ``limits``,
    observed by ``metrics``."""
    app = FastAPI(title="loraplex", version="0.1.0", description="OpenAI-compatible multi-LoRA inference server")
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.state.backend = backend
    app.state.resolver = resolver
    app.state.api = ApiState(backend, resolver, keys, metrics, limits,
                             Admission(backend, limits.max_queue, metrics))
    for router in ROUTERS:
        app.include_router(router)
    return app


class BodyLimit:
    """ASGI middleware: refuse request bodies over max_bytes (413, in the OpenAI envelope), by
    Content-Length up front or while a chunked body streams in."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app  # the ASGI app inside
        self.max_bytes = max_bytes  # largest body let through

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = errors.from_exception(RequestTooLargeError(f"request body is larger than {self.max_bytes} bytes"))
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await too_large(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise RequestTooLargeError(f"request body is larger than {self.max_bytes} bytes")
            return message

        try:
            await self.app(scope, counted, send)
        except RequestTooLargeError:
            await too_large(scope, receive, send)
