"""What every route of one app shares: the engine backend, the resolver, the keys, the metrics, the
request limits and the admission queue, kept on ``app.state`` and handed to routes by FastAPI's
``Depends(api_state)``; no route reaches them through a closure or a global."""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from .admission import Admission
from .auth import KeyStore, Principal
from .backend import EngineBackend
from .metrics import Metrics
from .registry_probe import RegistryProbe
from .resolver import Resolver, Served

PRINCIPAL = "loraplex.principal"  # where KeyGate leaves the authenticated Principal in the ASGI scope's state

__all__ = ["ApiState", "RequestLimits", "api_state"]

TEXT_WORKERS = 2  # threads for chat templates and logprob detokenization (apart from the registry's threadpool)


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """What one HTTP request may ask of the server (not an adapter's limits: see ``adapters.spec.Limits``)."""

    max_body_bytes: int = 1 << 20  # bytes of a request body, else 413
    max_tokens: int = 2048  # cap on a request's max_tokens (the server setting's default)
    max_queue: int = 256  # waiting requests before 429
    request_timeout: float = 600.0  # seconds for a whole request


@dataclass(frozen=True, slots=True)
class ApiState:
    """The per-app state the routes read; built once by ``create_app``."""

    backend: EngineBackend  # the engine the requests run on
    resolver: Resolver  # request ``model``/``adapters`` -> pinned adapters
    keys: KeyStore  # API keys, scopes and tenant patterns
    metrics: Metrics  # Prometheus counters and histograms
    limits: RequestLimits
    admission: Admission  # the bounded queue in front of the engine
    metrics_open: bool = False  # GET /metrics without a key (else it needs the ``metrics`` scope)
    registry_probe: RegistryProbe | None = None  # /ready waits for the registry (or a local cache) when set
    base_format: dict | None = None  # how the base is held (hardware.BaseFormat.as_dict), shown by /v1/models
    text_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(TEXT_WORKERS, thread_name_prefix="loraplex-text"))

    def principal(self, request: Request, scope: str) -> Principal:
        """Who the request acts as; 401 without a valid key, 403 without ``scope``."""
        p = request.scope.get("state", {}).get(PRINCIPAL)  # KeyGate authenticated it already
        if p is None:
            p = self.keys.authenticate(request.headers.get("authorization"), request.headers.get("x-api-key"))
        p.require(scope)
        return p

    async def off_loop(self, fn, *args):
        """``fn(*args)`` on the text workers: CPU work of one request (a chat template over many messages,
        detokenizing logprobs) that would stall every stream if it ran on the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.text_pool, functools.partial(fn, *args))

    async def resolve(self, req, user: str | None, who: Principal) -> Served:
        """The request body's ``model`` (or ``adapters``/``merge``) to pinned adapters, off the event loop
        (registry reads may block); the base model alone is answered here, never waiting on the registry."""
        if not req.adapters and req.merge is None and self.resolver.is_base(req.model):
            return self.resolver.resolve(req, user, who)
        return await run_in_threadpool(self.resolver.resolve, req, user, who, add_merge=self.backend.add_merge)


def api_state(request: Request) -> ApiState:
    """The FastAPI dependency: ``st: ApiState = Depends(api_state)``."""
    return request.app.state.api
