"""The admin API (keys with the ``admin`` scope): vLLM-compatible ``/v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` for adapter folders outside the registry, the engine's resident adapters
(``GET /v1/adapters``), pinning an adapter version in a device slot, and dropping the resolver's
registry cache (``POST /v1/admin/refresh``).

The key's adapter patterns hold here too: a tenant admin (``adapters: [acme-*]``) loads, unloads and pins
only ``acme-*`` names and lists only those adapters; a name outside them is refused before anything
looks it up (load: 403; unload and pin: the 404 of a name that does not exist)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from .auth import ADMIN, PermissionDeniedError, Principal
from .resolver import missing
from .schemas import LoadAdapterRequest, UnloadAdapterRequest
from .state import ApiState, api_state

router = APIRouter()


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(req: LoadAdapterRequest, request: Request, st: ApiState = Depends(api_state)):
    """Serve a folder as ``lora_name`` once it validates against the base and the engine can take it."""
    who = st.principal(request, ADMIN)
    if not who.may_use(req.lora_name):  # else a tenant admin could shadow another tenant's adapter for everyone
        raise PermissionDeniedError(f"API key {who.name!r} may not load an adapter named `{req.lora_name}`")
    await run_in_threadpool(st.resolver.add_local, req.lora_name, req.lora_path, st.backend.check_adapter)
    return Response(f"Success: LoRA adapter '{req.lora_name}' added successfully.", media_type="text/plain")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(req: UnloadAdapterRequest, request: Request, st: ApiState = Depends(api_state)):
    who = st.principal(request, ADMIN)
    if not who.may_use(req.lora_name):
        raise missing(req.lora_name)
    st.resolver.remove_local(req.lora_name)
    return Response(f"Success: LoRA adapter '{req.lora_name}' removed successfully.", media_type="text/plain")


@router.get("/v1/adapters")
async def adapters_status(request: Request, st: ApiState = Depends(api_state)):
    """The adapters the engine holds: tier (device | host | loading), slot, references, pinned; for a key
    limited to some adapters, only those (an admin-loaded folder by the name it was loaded as; merges,
    which mix names, not at all)."""
    who = st.principal(request, ADMIN)
    data = await st.backend.adapters()
    return {"object": "list", "data": [{"id": k, **v} for k, v in sorted(data.items()) if _visible(k, who, st)]}


def _visible(engine_name: str, who: Principal, st: ApiState) -> bool:
    """Whether an engine adapter (``NAME@V``, an admin-loaded folder, a merge) is the key's to see."""
    if who.all_adapters:
        return True
    local = [n for n, folder in st.resolver.local.items() if folder == engine_name]
    if local:
        return any(who.may_use(n) for n in local)
    return "@" in engine_name and who.may_use(engine_name)


@router.post("/v1/adapters/{ref}/{action}")
async def pin(ref: str, action: Literal["pin", "unpin"], request: Request, st: ApiState = Depends(api_state)):
    """Keep an adapter version resident in a device slot (pin), or let it be evicted again (unpin)."""
    who = st.principal(request, ADMIN)
    st.resolver.authorize(ref, who)  # outside the key's patterns: 404 before anything is looked up
    t = await run_in_threadpool(st.resolver.target, ref, None, who)
    await st.backend.pin(t.engine_name, action == "pin")
    return {"id": t.display, "pinned": action == "pin"}


@router.post("/v1/admin/refresh")
async def refresh(request: Request, st: ApiState = Depends(api_state)):
    st.principal(request, ADMIN)
    st.resolver.refresh()
    return {"refreshed": True}
