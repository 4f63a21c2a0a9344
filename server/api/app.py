"""The FastAPI app factory: OpenAI-compatible endpoints over an ``EngineBackend``.

Request lifecycle: authenticate -> validate the body (pydantic) -> resolve ``model`` (or the
``adapters`` mixture / ``merge``) to pinned adapters -> admission (bounded queue, else 429) ->
stream tokens from the backend -> OpenAI-shaped body or SSE chunks. A client that disconnects
aborts its generation; every error leaves through ``errors.py``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from adapters.errors import InvalidAdapterError, LoraplexError, NotFoundError
from adapters.spec import validate_adapter

from ..engine.request import RequestOutput
from . import errors
from .backend import EngineBackend
from .errors import OverloadedError, RequestTooLargeError, TimeoutError_
from .resolver import Resolver, Target
from .schemas import ChatCompletionRequest, CompletionRequest, LoadAdapterRequest, UnloadAdapterRequest


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its generation was aborted."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int = 1 << 20
    max_tokens: int = 4096  # cap on a request's max_tokens
    max_queue: int = 256  # waiting requests before 429
    request_timeout: float = 600.0  # seconds for a whole request


@dataclass(slots=True)
class Served:
    """What one request resolved to."""

    adapters: list[tuple[str, float]]  # engine names and weights
    display: str  # the response's "model"
    label: str  # metrics adapter label
    version: str
    targets: list[Target] = field(default_factory=list)


def create_app(backend: EngineBackend, resolver: Resolver, *, keys, metrics, limits: Limits = Limits(),
) -> FastAPI:
    app = FastAPI(title="loraplex", version="0.1.0", description="OpenAI-compatible multi-LoRA inference server")
    errors.install(app)
    app.state.backend = backend
    app.state.resolver = resolver

    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)

    def principal(request: Request, scope: str):
        p = keys.authenticate(request.headers.get("authorization"), request.headers.get("x-api-key"))
        p.require(scope)
        return p

    async def resolve(req, user: str | None, who) -> Served:
        def run() -> Served:
            if req.adapters:
                if not resolver.is_base(req.model):
                    raise InvalidAdapterError("with `adapters`, set `model` to the base model "
                                              f"({resolver.base_id}) or `base`")
                targets = [resolver.target(a.name, user) for a in req.adapters]
                for t in targets:
                    if not who.may_use(t.name):
                        raise NotFoundError(f"the model `{t.display}` does not exist")
                weights = [a.weight for a in req.adapters]
                if req.merge is not None:
                    name = backend.add_merge([t.engine_name for t in targets], {**req.merge.model_dump(), "weights": weights})
                    return Served([(name, 1.0)], name, "merge", "", targets)
                mix = [(t.engine_name, w) for t, w in zip(targets, weights)]
                display = "+".join(f"{t.display}*{w:g}" for t, w in zip(targets, weights))
                return Served(mix, display, "mix", "", targets)
            if req.merge is not None:
                raise InvalidAdapterError("`merge` needs the `adapters` to merge")
            if resolver.is_base(req.model):
                return Served([], resolver.base_id, "base", "")
            t = resolver.target(req.model, user)
            if not who.may_use(t.name):
                raise NotFoundError(f"the model `{req.model}` does not exist")
            return Served([(t.engine_name, 1.0)], t.display, t.name, t.version, [t])

        return await run_in_threadpool(run)

    outstanding = [0]  # admitted requests not yet finished (the event loop is single-threaded)

    class Ticket:
        def __init__(self, n: int) -> None:
            self.n = n

        def release(self) -> None:
            outstanding[0] -= self.n
            self.n = 0

    def admit(served: Served, n: int = 1) -> Ticket:
        """Bounded queue: at most max_queue requests beyond those the engine runs at once."""
        capacity = backend.stats()["kv_slots_total"] + limits.max_queue
        if outstanding[0] + n > capacity:
            metrics.observe_request(served.label, served.version, "rejected")
            raise OverloadedError(f"the server is at capacity ({outstanding[0]} requests in flight); retry later", 1)
        outstanding[0] += n
        return Ticket(n)

    async def generate_all(request: Request, prompt, params, served: Served, rid: str) -> list[RequestOutput]:
        """Run to completion, aborting if the client disconnects or the timeout passes. Each output's
        arrival time is stamped on it (for TTFT and inter-token metrics)."""
        outs: list[RequestOutput] = []

        async def consume():
            async for out in backend.generate(prompt, params, served.adapters, rid):
                out.arrived = time.monotonic()
                outs.append(out)

        task = asyncio.ensure_future(consume())
        deadline = time.monotonic() + limits.request_timeout
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=max(0.0, min(0.25, deadline - time.monotonic())))
                if task.done():
                    break
                if await request.is_disconnected():
                    task.cancel()
                    raise ClientGone
                if time.monotonic() > deadline:
                    task.cancel()
                    raise TimeoutError_(f"the request took longer than {limits.request_timeout:g} s")
            task.result()
        finally:
            if not task.done():
                task.cancel()
        return outs

    def record(served: Served, outs: list[RequestOutput], started: float, first: float | None, itl: list[float],
               outcome: str) -> None:
        last = outs[-1] if outs else None
        times = [o.arrived for o in outs if o.arrived is not None]
        if first is None and times:  # a non-streamed request: timings from the outputs' arrivals
            first, itl = times[0], [b - a for a, b in zip(times, times[1:])]
        metrics.observe_request(served.label, served.version, outcome, last.prompt_tokens if last else 0,
                                last.completion_tokens if last else 0, (first - started) if first else None, itl,
                                time.monotonic() - started)

    def headers(served: Served) -> dict[str, str]:
        return {"x-loraplex-adapter": served.display}

    def usage(out: RequestOutput) -> dict:
        return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                "total_tokens": out.prompt_tokens + out.completion_tokens}

    def raise_error(out: RequestOutput) -> None:
        if out.error is not None:
            raise out.error

    # ---- chat ---------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        who = principal(request, "inference")
        user = request.headers.get("x-loraplex-user") or req.user
        served = await resolve(req, user, who)
        prompt = backend.chat_prompt([m.as_template_input() for m in req.messages])
        max_tokens = min(req.max_completion_tokens or req.max_tokens or limits.max_tokens, limits.max_tokens)
        params = req.sampling(max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        ticket = admit(served)
        rid, created, started = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), time.monotonic()
        if req.stream:
            return StreamingResponse(_chat_stream(prompt, params, served, rid, created, started, req, ticket),
                                     media_type="text/event-stream", headers=headers(served),
                                     background=BackgroundTask(ticket.release))
        try:
            outs = await generate_all(request, prompt, params, served, rid)
        except ClientGone:
            record(served, [], started, None, [], "aborted")
            return Response(status_code=499)
        finally:
            ticket.release()
        raise_error(outs[-1])
        record(served, outs, started, None, [], "ok")
        last = outs[-1]
        text = "".join(o.new_text for o in outs)
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": last.finish_reason}
        if req.logprobs:
            choice["logprobs"] = {"content": _chat_logprobs(outs)}
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": served.display,
                             "choices": [choice], "usage": usage(last)}, headers=headers(served))

    def _chat_logprobs(outs: list[RequestOutput]) -> list[dict]:
        items = []
        tok = backend.token_text
        for o in outs:
            tops = o.new_top_logprobs or [[] for _ in o.new_token_ids]
            for tid, lp, top in zip(o.new_token_ids, o.new_logprobs, tops):
                name = tok(tid)
                items.append({"token": name, "logprob": lp, "bytes": list(name.encode()),
                              "top_logprobs": [{"token": tok(t), "logprob": v, "bytes": list(tok(t).encode())}
                                               for t, v in top]})
        return items

    async def _stream(prompt, params, served: Served, rid: str, started: float, req, ticket, base: dict,
                      choice: Callable[[RequestOutput], dict], head: dict | None = None) -> AsyncIterator[bytes]:
        """SSE chunks of one request (chat or completion: ``choice`` shapes each piece), ending in
        the usage chunk when asked for and ``data: [DONE]``; timings go to the metrics."""
        first = prev = None
        itl: list[float] = []
        outs: list[RequestOutput] = []
        outcome = "aborted"
        try:
            if head is not None:
                yield _sse({**base, "choices": [head]})
            stream = backend.generate(prompt, params, served.adapters, rid)
            while True:
                try:
                    out = await stream.__anext__()
                except StopAsyncIteration:
                    break
                except (LoraplexError, ValueError) as exc:  # refused by the engine (e.g. prompt too long)
                    outcome = "error"
                    yield _sse(_error_body(exc))
                    break
                outs.append(out)
                if out.error is not None:
                    outcome = "error"
                    yield _sse(_error_body(out.error))
                    break
                now = time.monotonic()
                if first is None:
                    first = now
                elif prev is not None:
                    itl.append(now - prev)
                prev = now
                if out.new_text or out.finished:
                    yield _sse({**base, "choices": [choice(out)]})
                if out.finished:
                    outcome = "ok"
            if outcome == "ok" and req.stream_options and req.stream_options.include_usage:
                yield _sse({**base, "choices": [], "usage": usage(outs[-1])})
            yield b"data: [DONE]\n\n"
        finally:
            ticket.release()
            record(served, outs, started, first, itl, outcome)

    def _chat_stream(prompt, params, served, rid, created, started, req, ticket) -> AsyncIterator[bytes]:
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served.display}

        def choice(out: RequestOutput) -> dict:
            return {"index": 0, "delta": {"content": out.new_text} if out.new_text or not out.finished else {},
                    "logprobs": {"content": _chat_logprobs([out])} if req.logprobs else None,
                    "finish_reason": out.finish_reason if out.finished else None}

        head = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return _stream(prompt, params, served, rid, started, req, ticket, base, choice, head)

    # ---- completions ----------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        who = principal(request, "inference")
        if req.echo:
            raise InvalidAdapterError("echo is not supported")
        user = request.headers.get("x-loraplex-user") or req.user
        served = await resolve(req, user, who)
        prompts = req.prompts()
        params = req.sampling(min(req.max_tokens or 16, limits.max_tokens), req.logprobs)
        if req.stream and len(prompts) != 1:
            raise InvalidAdapterError("streaming takes one prompt per request")
        ticket = admit(served, len(prompts))
        rid, created, started = f"cmpl-{uuid.uuid4().hex}", int(time.time()), time.monotonic()
        if req.stream:
            return StreamingResponse(_completion_stream(prompts[0], params, served, rid, created, started, req, ticket),
                                     media_type="text/event-stream", headers=headers(served),
                                     background=BackgroundTask(ticket.release))
        try:
            results = await asyncio.gather(*(generate_all(request, p, params, served, f"{rid}-{i}")
                                             for i, p in enumerate(prompts)))
        except ClientGone:
            record(served, [], started, None, [], "aborted")
            return Response(status_code=499)
        finally:
            ticket.release()
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, outs in enumerate(results):
            raise_error(outs[-1])
            record(served, outs, started, None, [], "ok")
            last = outs[-1]
            prompt_tokens += last.prompt_tokens
            completion_tokens += last.completion_tokens
            choices.append({"index": i, "text": "".join(o.new_text for o in outs), "logprobs": _completion_logprobs(outs)
                            if req.logprobs is not None else None, "finish_reason": last.finish_reason})
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": served.display,
                             "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                                           "total_tokens": prompt_tokens + completion_tokens}},
                            headers=headers(served))

    def _completion_logprobs(outs: list[RequestOutput]) -> dict:
        name = backend.token_text
        tokens, lps, tops = [], [], []
        for o in outs:
            for j, (tid, lp) in enumerate(zip(o.new_token_ids, o.new_logprobs)):
                tokens.append(name(tid))
                lps.append(lp)
                top = (o.new_top_logprobs or [[]] * len(o.new_token_ids))[j]
                tops.append({name(t): v for t, v in top} if top else None)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": None}

    def _completion_stream(prompt, params, served, rid, created, started, req, ticket) -> AsyncIterator[bytes]:
        base = {"id": rid, "object": "text_completion", "created": created, "model": served.display}

        def choice(out: RequestOutput) -> dict:
            return {"index": 0, "text": out.new_text, "logprobs": None,
                    "finish_reason": out.finish_reason if out.finished else None}

        return _stream(prompt, params, served, rid, started, req, ticket, base, choice)

    # ---- models, health, metrics ---------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(request: Request):
        who = principal(request, "inference")
        created = int(time.time())
        ids = await run_in_threadpool(resolver.listing)
        visible = [i for i in ids if who.may_use(i.partition("@")[0])]
        data = [{"id": resolver.base_id, "object": "model", "created": created, "owned_by": "loraplex",
                 "root": resolver.base_id, "parent": None}]
        data += [{"id": i, "object": "model", "created": created, "owned_by": "loraplex", "root": i,
                  "parent": resolver.base_id} for i in visible]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        return {"status": "ready", "model": resolver.base_id}

    @app.get("/metrics")
    async def metrics_endpoint():
        s = backend.stats()
        metrics.set_engine(s)
        if s.get("cache_hits") is not None:  # an engine that cannot tell (vLLM) leaves the counters unset
            metrics.update_adapter_cache(SimpleNamespace(hits=s["cache_hits"], misses=s["cache_misses"], loads=s["loads"],
                                                         evictions=s["evictions"], load_seconds=s["load_seconds"]))
        body_, content_type = metrics.render()
        return Response(body_, media_type=content_type)

    # ---- admin ---------------------------------------------------------------------------------------
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(req: LoadAdapterRequest, request: Request):
        principal(request, "admin")
        from adapters.reference import check_name

        check_name(req.lora_name)
        await run_in_threadpool(validate_adapter, _path(req.lora_path), resolver.base_info)
        resolver.local[req.lora_name] = str(_path(req.lora_path))
        await run_in_threadpool(backend.check_adapter, resolver.local[req.lora_name])
        return Response(f"Success: LoRA adapter '{req.lora_name}' added successfully.", media_type="text/plain")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(req: UnloadAdapterRequest, request: Request):
        principal(request, "admin")
        if resolver.local.pop(req.lora_name, None) is None:
            raise NotFoundError(f"the model `{req.lora_name}` does not exist")
        return Response(f"Success: LoRA adapter '{req.lora_name}' removed successfully.", media_type="text/plain")

    @app.get("/v1/adapters")
    async def adapters_status(request: Request):
        principal(request, "admin")
        data = await backend.adapters()
        return {"object": "list", "data": [{"id": k, **v} for k, v in sorted(data.items())]}

    @app.post("/v1/adapters/{ref}/{action}")
    async def pin(ref: str, action: Literal["pin", "unpin"], request: Request):
        """Keep an adapter version resident in a device slot (pin), or let it be evicted again (unpin)."""
        principal(request, "admin")
        t = await run_in_threadpool(resolver.target, ref, None)
        await backend.pin(t.engine_name, action == "pin")
        return {"id": t.display, "pinned": action == "pin"}

    @app.post("/v1/admin/refresh")
    async def refresh(request: Request):
        principal(request, "admin")
        resolver.refresh()
        return {"refreshed": True}

    return app


def _path(p: str):
    from pathlib import Path

    return Path(p).expanduser()


class BodyLimit:
    """Refuse request bodies over max_bytes, by Content-Length or while a chunked body streams in."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = errors.from_exception(RequestTooLargeError(f"request body is larger than {self.max_bytes} bytes"))
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await too_large(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise RequestTooLargeError(f"request body is larger than {self.max_bytes} bytes")
            return message

        try:
            await self.app(scope, counted, send)
        except RequestTooLargeError:
            await too_large(scope, receive, send)


def _error_body(exc: Exception) -> dict:
    return json.loads(errors.from_exception(exc).body)


def _sse(obj: dict) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()
