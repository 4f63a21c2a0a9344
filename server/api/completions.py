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
    if req.echo and req.stream:
        raise InvalidAdapterError("echo is served on whole responses, not streamed ones")
    prompts = req.prompts()
    st.admission.check_key(who, len(prompts) * req.n)
    user = request.headers.get("x-loraplex-user") or req.user
    served = await st.resolve(req, user, who)
    backend, limits = st.backend, st.limits
    score_only = req.max_tokens == 0  # (with echo: the prompt's logprobs; one token is generated, then dropped)
    max_tokens = 1 if score_only else min(req.max_tokens or 16, limits.max_tokens)
    scored = req.logprobs if req.echo and req.logprobs is not None else None  # the prompt's logprobs, echoed
    if req.prompt_logprobs is not None:
        scored = max(scored or 0, req.prompt_logprobs)
    params = choices(req.sampling(max_tokens, req.logprobs, who, prompt_logprobs=scored), req.n)
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
    echo = None
    if req.echo:
        echo = [p if isinstance(p, str) else await st.off_loop(backend.detokenize, p) for p in prompts]
    tok = backend.token_text if req.logprobs is not None else None
    prompt_tok = backend.token_text if req.prompt_logprobs is not None else None
    body = responses.completion_body(rid, created, served, results, None, echo, score_only) \
        if tok is None and prompt_tok is None else \
        await st.off_loop(responses.completion_body, rid, created, served, results, tok, echo, score_only, prompt_tok)
    return JSONResponse(body, headers=responses.headers(served))
