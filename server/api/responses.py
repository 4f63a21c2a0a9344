"""OpenAI response bodies and server-sent-event framing, made here and nowhere else.

Whole bodies (``chat.completion``, ``text_completion``), the chunks of a stream (``ChatChunks``,
``CompletionChunks``: the same shapes piece by piece), logprobs in each endpoint's shape, ``usage``,
the SSE frame and the error event a stream ends with when generation fails after the 200 went out.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from ..engine.request import RequestOutput
from . import errors
from .resolver import Served

DONE = b"data: [DONE]\n\n"  # the last SSE event of every stream

TokenText = Callable[[int], str]  # the backend's token_text: token id -> its text


def sse(obj: dict) -> bytes:
    """One SSE event carrying ``obj`` as compact JSON."""
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def error_body(exc: Exception) -> dict:
    """The OpenAI error envelope of ``exc``, as a dict (for an SSE error event)."""
    return json.loads(errors.from_exception(exc).body)


def headers(served: Served) -> dict[str, str]:
    """Response headers naming what served the request."""
    return {"x-loraplex-adapter": served.display}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage; ``prompt_tokens_details.cached_tokens``: prompt tokens the prefix cache served (only ever
    from this key's own earlier requests: the cache is salted per API key)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


# ---- logprobs --------------------------------------------------------------------------------------------
def chat_logprobs(outs: list[RequestOutput], tok: TokenText) -> list[dict]:
    """Chat's ``logprobs.content``: one entry per token, with its top alternatives."""
    items = []
    for o in outs:
        tops = o.new_top_logprobs or [[] for _ in o.new_token_ids]
        for tid, lp, top in zip(o.new_token_ids, o.new_logprobs, tops):
            name = tok(tid)
            items.append({"token": name, "logprob": lp, "bytes": list(name.encode()),
                          "top_logprobs": [{"token": tok(t), "logprob": v, "bytes": list(tok(t).encode())}
                                           for t, v in top]})
    return items


def completion_logprobs(outs: list[RequestOutput], tok: TokenText) -> dict:
    """The legacy completions ``logprobs``: parallel lists of tokens, logprobs and top alternatives."""
    tokens, lps, tops = [], [], []
    for o in outs:
        for j, (tid, lp) in enumerate(zip(o.new_token_ids, o.new_logprobs)):
            tokens.append(tok(tid))
            lps.append(lp)
            top = (o.new_top_logprobs or [[]] * len(o.new_token_ids))[j]
            tops.append({tok(t): v for t, v in top} if top else None)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": None}


# ---- whole bodies ----------------------------------------------------------------------------------------
def usage_of_choices(lasts: list[RequestOutput]) -> dict:
    """Usage of one prompt's choices (their last outputs): the prompt counted once, every choice's tokens."""
    return usage(lasts[0].prompt_tokens, sum(o.completion_tokens for o in lasts), lasts[0].cached_tokens)


def chat_body(rid: str, created: int, served: Served, choices: list[list[RequestOutput]],
              tok: TokenText | None, prompt_tok: TokenText | None = None) -> dict:
    """A ``chat.completion`` from each finished choice's outputs; ``tok`` given: with logprobs; ``prompt_tok``
    given: with vLLM's ``prompt_logprobs`` (of the templated prompt)."""
    out = []
    for i, outs in enumerate(choices):
        out.append({"index": i, "message": {"role": "assistant", "content": "".join(o.new_text for o in outs)},
                    "logprobs": {"content": chat_logprobs(outs, tok)} if tok is not None else None,
                    "finish_reason": outs[-1].finish_reason})
    body = {"id": rid, "object": "chat.completion", "created": created, "model": served.display,
            "choices": out, "usage": usage_of_choices([c[-1] for c in choices])}
    if prompt_tok is not None:
        body["prompt_logprobs"] = vllm_prompt_logprobs(choices[0][0], prompt_tok)
    return body


def vllm_prompt_logprobs(first: RequestOutput, tok: TokenText) -> list[dict | None]:
    """vLLM's ``prompt_logprobs``: None for the first prompt token, then per token a map of token id to its
    logprob, rank and text, holding the prompt's token and the most likely alternatives asked for."""
    items: list[dict | None] = [None]
    for tid, (lp, rank, top) in zip(first.prompt_token_ids[1:], first.prompt_logprobs):
        entry = {str(t): {"logprob": v, "rank": r + 1, "decoded_token": tok(t)} for r, (t, v) in enumerate(top)}
        entry[str(tid)] = {"logprob": lp, "rank": rank, "decoded_token": tok(tid)}
        items.append(entry)
    return items


def completion_body(rid: str, created: int, served: Served, results: list[list[list[RequestOutput]]],
                    tok: TokenText | None, echo: list[str] | None = None, score_only: bool = False,
                    prompt_tok: TokenText | None = None) -> dict:
    """A ``text_completion`` with the choices of each prompt in turn (prompt p's choice i at index p * n + i, as
    OpenAI orders them); ``tok`` given: with logprobs. ``echo``: each prompt's text, put before its choices' text
    (and, with logprobs, its tokens first: the first with a null logprob, as OpenAI did); ``score_only``
    (``max_tokens`` 0): the prompt alone, the one token generated for it dropped. ``prompt_tok`` given: vLLM's
    ``prompt_logprobs`` on each choice."""
    choices, prompt_tokens, completion_tokens, cached_tokens = [], 0, 0, 0
    for p, per_prompt in enumerate(results):
        u = usage_of_choices([c[-1] for c in per_prompt])
        prompt_tokens += u["prompt_tokens"]
        cached_tokens += u["prompt_tokens_details"]["cached_tokens"]
        completion_tokens += 0 if score_only else u["completion_tokens"]
        for outs in per_prompt:
            text = "" if score_only else "".join(o.new_text for o in outs)
            logprobs = None
            if tok is not None:
                logprobs = completion_logprobs([] if score_only else outs, tok)
                if echo is not None:
                    first = outs[0]
                    logprobs = {
                        "tokens": [tok(t) for t in first.prompt_token_ids] + logprobs["tokens"],
                        "token_logprobs": [None] + [lp for lp, _, _ in first.prompt_logprobs]
                        + logprobs["token_logprobs"],
                        "top_logprobs": [None] + [{tok(t): v for t, v in top} for _, _, top in first.prompt_logprobs]
                        + logprobs["top_logprobs"], "text_offset": None}
            choice = {"index": len(choices), "text": (echo[p] if echo is not None else "") + text,
                      "logprobs": logprobs, "finish_reason": "length" if score_only else outs[-1].finish_reason}
            if prompt_tok is not None:
                choice["prompt_logprobs"] = vllm_prompt_logprobs(outs[0], prompt_tok)
            choices.append(choice)
    return {"id": rid, "object": "text_completion", "created": created, "model": served.display,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


# ---- stream chunks ---------------------------------------------------------------------------------------
class ChatChunks:
    """The ``chat.completion.chunk`` events of one stream: a role head, one per piece, usage."""

    def __init__(self, rid: str, created: int, served: Served, tok: TokenText | None) -> None:
        self.base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served.display}
        self.tok = tok  # set when the request asked for logprobs

    def head(self, index: int = 0) -> dict | None:
        return {**self.base, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]}

    def piece(self, out: RequestOutput, index: int = 0) -> dict:
        choice = {"index": index, "delta": {"content": out.new_text} if out.new_text or not out.finished else {},
                  "logprobs": {"content": chat_logprobs([out], self.tok)} if self.tok is not None else None,
                  "finish_reason": out.finish_reason if out.finished else None}
        return {**self.base, "choices": [choice]}

    def usage(self, lasts: list[RequestOutput]) -> dict:
        return {**self.base, "choices": [], "usage": usage_of_choices(lasts)}


class CompletionChunks(ChatChunks):
    """The ``text_completion`` events of one stream: one per piece, usage; no head."""

    def __init__(self, rid: str, created: int, served: Served) -> None:
        self.base = {"id": rid, "object": "text_completion", "created": created, "model": served.display}
        self.tok = None

    def head(self, index: int = 0) -> dict | None:
        return None

    def piece(self, out: RequestOutput, index: int = 0) -> dict:
        return {**self.base, "choices": [{"index": index, "text": out.new_text, "logprobs": None,
                                          "finish_reason": out.finish_reason if out.finished else None}]}
