"""``POST /v1/completions``: OpenAI (legacy) text completions, one choice per prompt, or one prompt
streamed (SSE)."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from loraplex.adapters.errors import InvalidAdapterError

from . import responses
from .auth import INFERENCE
from .generation import ClientGone, choices, generate_all, raise_error, record, sse_stream
from .schemas import CompletionRequest
from .state import ApiState, api_state

router = APIRouter()


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request, st: ApiState = Depends(api_state)):
    who = st.principal(request, INFERENCE)
    if req.echo:
        raise InvalidAdapterError("echo is not supported")
    prompts = req.prompts()
    st.admission.check_key(who, len(prompts) * req.n)
    user = request.headers.get("x-loraplex-user") or req.user
    served = await st.resolve(req, user, who)
    backend, limits = st.backend, st.limits
    params = choices(req.sampling(min(req.max_tokens or 16, limits.max_tokens), req.logprobs, who), req.n)
    if req.stream and len(prompts) != 1:
        raise InvalidAdapterError("streaming takes one prompt per request")
    ticket = st.admission.admit(len(prompts) * req.n, adapter=served.label, version=served.version, who=who)
    rid, created, started = f"cmpl-{uuid.uuid4().hex}", int(time.time()), time.monotonic()
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = sse_stream(backend, st.metrics, prompts[0], params, served, rid, started, ticket,
                            responses.CompletionChunks(rid, created, served), include_usage, limits.request_timeout)
        return StreamingResponse(events, media_type="text/event-stream", headers=responses.headers(served),
                                 background=BackgroundTask(ticket.release))
    try:
        results = await asyncio.gather(*(generate_all(backend, request, p, params, served, f"{rid}-{i}",
                                                      limits.request_timeout) for i, p in enumerate(prompts)))
    except ClientGone:
        record(st.metrics, served, [], started, None, [], "aborted")
        return Response(status_code=499)
    finally:
        ticket.release()
    for per_prompt in results:
        raise_error(per_prompt)
    for per_prompt in results:
        for outs in per_prompt:
            record(st.metrics, served, outs, started, None, [], "ok")
    if req.logprobs is None:
        body = responses.completion_body(rid, created, served, results, None)
    else:
        body = await st.off_loop(responses.completion_body, rid, created, served, results, backend.token_text)
    return JSONResponse(body, headers=responses.headers(served))
