"""The admin API (keys with the ``admin`` scope): vLLM-compatible ``/v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` for adapter folders outside the registry, the engine's resident adapters
(``GET /v1/adapters``), pinning an adapter version in a device slot, and dropping the resolver's
registry cache (``POST /v1/admin/refresh``)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from .auth import ADMIN
from .schemas import LoadAdapterRequest, UnloadAdapterRequest
from .state import ApiState, api_state

router = APIRouter()


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(req: LoadAdapterRequest, request: Request, st: ApiState = Depends(api_state)):
    """Serve a folder as ``lora_name`` once it validates against the base and the engine can take it."""
    st.principal(request, ADMIN)
    await run_in_threadpool(st.resolver.add_local, req.lora_name, req.lora_path, st.backend.check_adapter)
    return Response(f"Success: LoRA adapter '{req.lora_name}' added successfully.", media_type="text/plain")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(req: UnloadAdapterRequest, request: Request, st: ApiState = Depends(api_state)):
    st.principal(request, ADMIN)
    st.resolver.remove_local(req.lora_name)
    return Response(f"Success: LoRA adapter '{req.lora_name}' removed successfully.", media_type="text/plain")


@router.get("/v1/adapters")
async def adapters_status(request: Request, st: ApiState = Depends(api_state)):
    """The adapters the engine holds: tier (device | host | loading), slot, references, pinned."""
    st.principal(request, ADMIN)
    data = await st.backend.adapters()
    return {"object": "list", "data": [{"id": k, **v} for k, v in sorted(data.items())]}


@router.post("/v1/adapters/{ref}/{action}")
async def pin(ref: str, action: Literal["pin", "unpin"], request: Request, st: ApiState = Depends(api_state)):
    """Keep an adapter version resident in a device slot (pin), or let it be evicted again (unpin)."""
    st.principal(request, ADMIN)
    t = await run_in_threadpool(st.resolver.target, ref, None)
    await st.backend.pin(t.engine_name, action == "pin")
    return {"id": t.display, "pinned": action == "pin"}


@router.post("/v1/admin/refresh")
async def refresh(request: Request, st: ApiState = Depends(api_state)):
    st.principal(request, ADMIN)
    st.resolver.refresh()
    return {"refreshed": True}
