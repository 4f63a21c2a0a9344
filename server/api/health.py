"""``GET /health`` (the process answers), ``GET /ready`` (the base model is loaded and served) and
``GET /metrics`` (Prometheus text: request metrics, engine gauges, adapter cache counters). The first two
need no API key; ``/metrics`` names every tenant's adapters and traffic, so it needs a key with the
``metrics`` scope unless the operator opened it (``metrics_open``) or the server has no keys at all."""

from __future__ import annotations

from types import SimpleNamespace

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from loraplex.adapters.errors import EngineUnavailableError, StorageError

from .auth import METRICS
from .state import ApiState, api_state

router = APIRouter()


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/ready")
async def ready(st: ApiState = Depends(api_state)):
    """200 while the engine serves; 503 while it is down or restarting (so a load balancer drains this replica),
    and at start while the adapter registry is unreachable with nothing cached locally (``RegistryProbe``)."""
    if not st.backend.ready:
        raise EngineUnavailableError("the engine is restarting")
    if st.registry_probe is not None and not st.registry_probe.ready:
        raise StorageError(st.registry_probe.reason or "checking the adapter registry")
    return {"status": "ready", "model": st.resolver.base_id}


@router.get("/metrics")
async def metrics_endpoint(request: Request, st: ApiState = Depends(api_state)):
    if not st.metrics_open:
        st.principal(request, METRICS)
    metrics = st.metrics
    s = st.backend.stats()
    metrics.set_engine(s)
    metrics.set_registry_stale(st.resolver.stale_served)
    if s.get("cache_hits") is not None:  # an engine that cannot tell (vLLM) leaves the counters unset
        metrics.update_adapter_cache(SimpleNamespace(hits=s["cache_hits"], misses=s["cache_misses"], loads=s["loads"],
                                                     evictions=s["evictions"], load_seconds=s["load_seconds"],
                                                     load_seconds_count=s.get("load_seconds_count")))
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
