"""The FastAPI app factory: OpenAI-compatible endpoints over an ``EngineBackend``.

Request lifecycle: authenticate (``KeyGate``, before the body is read) -> validate the body (pydantic)
-> the route's scope -> resolve ``model`` (or the ``adapters`` mixture / ``merge``) to pinned adapters,
each name authorized before it is looked up -> admission (bounded queue and the key's own limit, else 429) ->
stream tokens from the backend -> OpenAI-shaped body or SSE chunks. A client that disconnects
aborts its generation; every error leaves through ``errors.py``.

``create_app`` only wires: the error handlers, the key and body-size middlewares, the shared state
(``state.ApiState``) and one router per endpoint group (``chat``, ``completions``, ``models``,
``admin``, ``health``).
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.datastructures import Headers

from . import admin, chat, completions, errors, health, models, tokenize
from .admission import Admission
from .auth import AuthenticationError, KeyStore
from .backend import EngineBackend
from .errors import RequestTooLargeError
from .metrics import Metrics
from .registry_probe import RegistryProbe
from .resolver import Resolver
from .state import PRINCIPAL, ApiState, RequestLimits

__all__ = ["BodyLimit", "KeyGate", "RequestLimits", "create_app"]

ROUTERS = (chat.router, completions.router, tokenize.router, models.router, admin.router, health.router)
# Paths answered without a key at the gate: probes, the API's description, and /metrics (its own check).
PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


def create_app(backend: EngineBackend, resolver: Resolver, *, keys: KeyStore, metrics: Metrics,
               limits: RequestLimits = RequestLimits(), metrics_open: bool = False,
               registry_probe: RegistryProbe | None = None, base_format: dict | None = None) -> FastAPI:
    """The API over ``backend``: requests resolved by ``resolver``, guarded by ``keys`` and ``limits``,
    observed by ``metrics`` (``GET /metrics`` without a key when ``metrics_open``); ``/ready`` also waits on
    ``registry_probe`` when one is given."""
    app = FastAPI(title="loraplex", version="0.1.0", description="OpenAI-compatible multi-LoRA inference server")
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(KeyGate, keys=keys)  # added last: runs first
    app.state.api = ApiState(backend, resolver, keys, metrics, limits,
                             Admission(backend, limits.max_queue, metrics), metrics_open, registry_probe,
                             base_format)
    for router in ROUTERS:
        app.include_router(router)
    return app


class KeyGate:
    """ASGI middleware: a request to any path but :data:`PUBLIC_PATHS` needs a valid API key before its
    body is read or parsed (else 401, in the OpenAI envelope), so a client without a key costs no JSON
    parsing and learns nothing from validation errors. Which scope a route needs stays the route's check."""

    def __init__(self, app, keys: KeyStore) -> None:
        self.app = app  # the ASGI app inside
        self.keys = keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.keys.is_open or scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        try:
            who = self.keys.authenticate(headers.get("authorization"), headers.get("x-api-key"))
        except AuthenticationError as exc:
            return await errors.from_exception(exc)(scope, receive, send)
        scope.setdefault("state", {})[PRINCIPAL] = who  # the route reads it: one key check per request
        return await self.app(scope, receive, send)


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
