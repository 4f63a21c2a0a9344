"""``GET /v1/models``: the base model and every adapter, version, alias and admin-loaded name the
caller's key may use (OpenAI's model list; adapters name the base as their ``parent``)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool

from .auth import INFERENCE
from .state import ApiState, api_state

router = APIRouter()


def _model(model_id: str, created: int, parent: str | None) -> dict:
    """One entry of the list; the base model is its own root."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "loraplex", "root": model_id,
            "parent": parent}


@router.get("/v1/models")
async def models(request: Request, st: ApiState = Depends(api_state)):
    who = st.principal(request, INFERENCE)
    resolver = st.resolver
    created = int(time.time())
    ids = await run_in_threadpool(resolver.listing)
    visible = who.visible(ids)
    base = _model(resolver.base_id, created, None)
    if st.base_format:
        base["metadata"] = st.base_format  # quantize, weights, dtype, and what chose them (set, or the hardware)
    data = [base]
    data += [_model(i, created, resolver.base_id) for i in visible]
    return {"object": "list", "data": data}
