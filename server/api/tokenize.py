"""``POST /tokenize`` and ``POST /detokenize``: the base model's tokenizer, with vLLM's request and response shapes
(a prompt or chat messages to token ids and back). ``model`` may name the base or any adapter the caller's key may
use (adapters share the base's tokenizer); a name the key may not use is a 404, as on the generation endpoints."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from .auth import INFERENCE
from .schemas import DetokenizeRequest, TokenizeChatRequest, TokenizeRequest
from .state import ApiState, api_state

router = APIRouter()


async def _check_model(req, request: Request, st: ApiState) -> None:
    who = st.principal(request, INFERENCE)
    if req.model is not None:
        await st.resolve(req, request.headers.get("x-loraplex-user"), who)


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request,
                   st: ApiState = Depends(api_state)):
    await _check_model(req, request, st)
    backend = st.backend
    if isinstance(req, TokenizeChatRequest):
        messages = [m.as_template_input() for m in req.messages]
        text = await st.off_loop(backend.chat_prompt, messages, req.add_generation_prompt, req.continue_final_message)
    else:
        text = req.prompt
    ids = await st.off_loop(backend.tokenize, text, req.add_special_tokens)
    body = {"count": len(ids), "max_model_len": backend.max_model_len, "tokens": ids}
    if req.return_token_strs:
        body["token_strs"] = await st.off_loop(backend.token_strs, ids)
    return body


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request, st: ApiState = Depends(api_state)):
    await _check_model(req, request, st)
    return {"prompt": await st.off_loop(st.backend.detokenize, list(req.tokens))}
