"""Running a request on the engine backend, for a whole body or as a stream of SSE events.

``generate_all`` runs one generation to completion, aborting it when the client disconnects
(``ClientGone``) or the request's time runs out (504). ``sse_stream`` yields the SSE events of one
streamed generation; leaving it early (the client went away) aborts the generation. Both stamp each
output's arrival time, and ``record`` turns a finished request into metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import Request

from loraplex.adapters.errors import LoraplexError

from ..engine.request import RequestOutput, SamplingParams
from .admission import Ticket
from .backend import EngineBackend
from .errors import TimeoutError_
from .metrics import Metrics
from .resolver import Served
from .responses import DONE, ChatChunks, error_body, sse

_POLL = 0.25  # seconds between checks for a disconnected client


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its generation was aborted."""


async def generate_all(backend: EngineBackend, request: Request, prompt: str | list[int], params: SamplingParams,
                       served: Served, rid: str, timeout: float) -> list[RequestOutput]:
    """Run to completion, aborting if the client disconnects or ``timeout`` seconds pass. Each output's
    arrival time is stamped on it (for TTFT and inter-token metrics). Errors the engine raises are
    raised; an output carrying an error is returned as is (see ``raise_error``)."""
    outs: list[RequestOutput] = []

    async def consume():
        async for out in backend.generate(prompt, params, served.adapters, rid):
            out.arrived = time.monotonic()
            outs.append(out)

    task = asyncio.ensure_future(consume())
    deadline = time.monotonic() + timeout
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=max(0.0, min(_POLL, deadline - time.monotonic())))
            if task.done():
                break
            if await request.is_disconnected():
                task.cancel()
                raise ClientGone
            if time.monotonic() > deadline:
                task.cancel()
                raise TimeoutError_(f"the request took longer than {timeout:g} s")
        task.result()
    finally:
        if not task.done():
            task.cancel()
    return outs


def raise_error(out: RequestOutput) -> None:
    """Raise the error a failed generation's last output carries."""
    if out.error is not None:
        raise out.error


def record(metrics: Metrics, served: Served, outs: list[RequestOutput], started: float, first: float | None,
           itl: list[float], outcome: str) -> None:
    """One finished request into the metrics: tokens, TTFT, inter-token gaps and end-to-end time. Without
    ``first`` (a non-streamed request) the timings come from the outputs' arrival stamps."""
    last = outs[-1] if outs else None
    times = [o.arrived for o in outs if o.arrived is not None]
    if first is None and times:
        first, itl = times[0], [b - a for a, b in zip(times, times[1:])]
    metrics.observe_request(served.label, served.version, outcome, last.prompt_tokens if last else 0,
                            last.completion_tokens if last else 0, (first - started) if first else None, itl,
                            time.monotonic() - started)


async def sse_stream(backend: EngineBackend, metrics: Metrics, prompt: str | list[int], params: SamplingParams,
                     served: Served, rid: str, started: float, ticket: Ticket, chunks: ChatChunks,
                     include_usage: bool, timeout: float | None = None) -> AsyncIterator[bytes]:
    """The SSE events of one request (``chunks`` shapes them: chat or completion), ending in the usage
    chunk when asked for and ``data: [DONE]``; an engine error becomes an error event, and so does a stream
    still running ``timeout`` seconds after ``started`` (its generation is aborted). Gives the ticket back and
    records the metrics however it ends."""
    first = prev = None
    itl: list[float] = []
    outs: list[RequestOutput] = []
    outcome = "aborted"
    stream = None
    try:
        head = chunks.head()
        if head is not None:
            yield sse(head)
        stream = backend.generate(prompt, params, served.adapters, rid)
        deadline = None if timeout is None else started + timeout
        while True:
            try:
                if deadline is None:
                    out = await stream.__anext__()
                else:
                    out = await asyncio.wait_for(stream.__anext__(), max(0.0, deadline - time.monotonic()))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                outcome = "error"
                yield sse(error_body(TimeoutError_(f"the request took longer than {timeout:g} s")))
                break
            except (LoraplexError, ValueError) as exc:  # refused by the engine (e.g. prompt too long)
                outcome = "error"
                yield sse(error_body(exc))
                break
            outs.append(out)
            if out.error is not None:
                outcome = "error"
                yield sse(error_body(out.error))
                break
            now = time.monotonic()
            if first is None:
                first = now
            elif prev is not None:
                itl.append(now - prev)
            prev = now
            if out.new_text or out.finished:
                yield sse(chunks.piece(out))
            if out.finished:
                outcome = "ok"
        if outcome == "ok" and include_usage:
            yield sse(chunks.usage(outs[-1]))
        yield DONE
    finally:
        ticket.release()
        record(metrics, served, outs, started, first, itl, outcome)
        close = getattr(stream, "aclose", None) if stream is not None else None
        if close is not None:  # leaving the engine's stream early aborts its generation now, not at GC
            await close()
