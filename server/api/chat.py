"""``POST /v1/chat/completions``: OpenAI chat completions, whole or streamed (SSE), over any adapter,
mixture or merge the request names."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from . import responses
from .auth import INFERENCE
from .generation import ClientGone, choices, generate_all, raise_error, record, sse_stream
from .schemas import ChatCompletionRequest
from .state import ApiState, api_state

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat(req: ChatCompletionRequest, request: Request, st: ApiState = Depends(api_state)):
    who = st.principal(request, INFERENCE)
    st.admission.check_key(who, req.n)
    user = request.headers.get("x-loraplex-user") or req.user
    served = await st.resolve(req, user, who)
    backend, limits = st.backend, st.limits
    prompt = await st.off_loop(backend.chat_prompt, [m.as_template_input() for m in req.messages])
    max_tokens = min(req.max_completion_tokens or req.max_tokens or limits.max_tokens, limits.max_tokens)
    params = choices(req.sampling(max_tokens, (req.top_logprobs or 0) if req.logprobs else None, who), req.n)
    tok = backend.token_text if req.logprobs else None
    ticket = st.admission.admit(req.n, adapter=served.label, version=served.version, who=who)
    rid, created, started = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), time.monotonic()
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = sse_stream(backend, st.metrics, prompt, params, served, rid, started, ticket,
                            responses.ChatChunks(rid, created, served, tok), include_usage, limits.request_timeout)
        return StreamingResponse(events, media_type="text/event-stream", headers=responses.headers(served),
                                 background=BackgroundTask(ticket.release))
    try:
        outs = await generate_all(backend, request, prompt, params, served, rid, limits.request_timeout)
    except ClientGone:
        record(st.metrics, served, [], started, None, [], "aborted")
        return Response(status_code=499)
    finally:
        ticket.release()
    raise_error(outs)
    for choice in outs:
        record(st.metrics, served, choice, started, None, [], "ok")
    prompt_tok = backend.token_text if req.prompt_logprobs is not None else None
    body = responses.chat_body(rid, created, served, outs, None) if tok is None and prompt_tok is None \
        else await st.off_loop(responses.chat_body, rid, created, served, outs, tok, prompt_tok)
    return JSONResponse(body, headers=responses.headers(served))
