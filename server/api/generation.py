"""Running a request on the engine backend, for a whole body or as a stream of SSE events.

A request is one or more *choices* (OpenAI's ``n``): generations of one prompt, each with its own sampling
parameters (``choices``: a seed given, choice i samples with seed + i). ``fan_out`` runs them: the first alone
until its first output (its prompt is then computed and, with prefix caching, in the cache), then the others,
which find the prompt there instead of computing it again; their outputs come interleaved, tagged with the
choice's index. ``generate_all`` runs a request to completion, aborting it when the client disconnects
(``ClientGone``) or the request's time runs out (504). ``sse_stream`` yields the SSE events of a streamed
request; leaving it early (the client went away) aborts its generations. Both stamp each output's arrival
time, and ``record`` turns a finished generation into metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

from fastapi import Request

from loraplex.adapters.errors import LoraplexError

from ..engine.request import SEED_RANGE, RequestOutput, SamplingParams
from .admission import Ticket
from .backend import EngineBackend
from .errors import TimeoutError_
from .metrics import Metrics
from .resolver import Served
from .responses import DONE, ChatChunks, error_body, sse

_POLL = 0.25  # seconds between checks for a disconnected client


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its generation was aborted."""


def choices(params: SamplingParams, n: int) -> list[SamplingParams]:
    """The parameters of ``n`` choices: choice i's seed is the request's + i (wrapping within the seed range), so
    seeded choices differ from each other and each is reproducible; unseeded and greedy ones are left as they are."""
    if params.seed is None:
        return [params] * n
    lo, hi = SEED_RANGE
    return [dataclasses.replace(params, seed=(params.seed + i - lo) % (hi - lo + 1) + lo) for i in range(n)]


async def fan_out(backend: EngineBackend, prompt: str | list[int], params: list[SamplingParams], served: Served,
                  rid: str) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) of every choice's generation as they come; an error a generation raises is raised
    here. Choice 0 starts alone; the others start once it has given its first output. Leaving early aborts them
    all (their streams are closed before this generator is)."""
    if len(params) == 1:  # (most requests: the engine's stream as it is, no task or queue between)
        stream = backend.generate(prompt, params[0], served.adapters, rid)
        try:
            async for out in stream:
                yield 0, out
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:  # leaving the engine's stream early aborts its generation now, not at GC
                await close()
        return
    queue: asyncio.Queue = asyncio.Queue()
    streams: list = []
    tasks: list[asyncio.Task] = []

    async def pump(i: int) -> None:
        stream = backend.generate(prompt, params[i], served.adapters, f"{rid}-{i}")
        streams.append(stream)
        try:
            async for out in stream:
                queue.put_nowait((i, out, None))
            queue.put_nowait((i, None, None))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # handed to the consumer, which decides
            queue.put_nowait((i, None, exc))

    tasks.append(asyncio.ensure_future(pump(0)))
    live, started_rest = 1, False
    try:
        while live:
            i, out, exc = await queue.get()
            if exc is not None:
                raise exc
            if out is None:
                live -= 1
            else:
                yield i, out
            if not started_rest and (out is None or i == 0):  # choice 0's prompt is computed (or it ended)
                started_rest = True
                tasks += [asyncio.ensure_future(pump(j)) for j in range(1, len(params))]
                live += len(params) - 1
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:  # leaving the engine's stream early aborts its generation now, not at GC
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()


async def generate_all(backend: EngineBackend, request: Request, prompt: str | list[int],
                       params: list[SamplingParams], served: Served, rid: str,
                       timeout: float) -> list[list[RequestOutput]]:
    """Run every choice to completion (one output list per choice), aborting if the client disconnects or
    ``timeout`` seconds pass. Each output's arrival time is stamped on it (for TTFT and inter-token metrics).
    Errors the engine raises are raised; an output carrying an error is returned as is (see ``raise_error``)."""
    outs: list[list[RequestOutput]] = [[] for _ in params]

    async def consume():
        async for i, out in fan_out(backend, prompt, params, served, rid):
            out.arrived = time.monotonic()
            outs[i].append(out)
            if out.error is not None:
                return

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


def raise_error(choices: list[list[RequestOutput]]) -> None:
    """Raise the error a failed generation's last output carries (the first such among the choices; the others
    were left unfinished when it failed)."""
    for outs in choices:
        if outs and outs[-1].error is not None:
            raise outs[-1].error


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


async def sse_stream(backend: EngineBackend, metrics: Metrics, prompt: str | list[int], params: list[SamplingParams],
                     served: Served, rid: str, started: float, ticket: Ticket, chunks: ChatChunks,
                     include_usage: bool, timeout: float | None = None) -> AsyncIterator[bytes]:
    """The SSE events of one request's choices (``chunks`` shapes them: chat or completion; each chunk names its
    choice's index), ending in the usage chunk when asked for and ``data: [DONE]``; an engine error becomes an
    error event, and so does a stream still running ``timeout`` seconds after ``started`` (its generations are
    aborted). Gives the ticket back and records the metrics however it ends."""
    n = len(params)
    first: list[float | None] = [None] * n
    prev: list[float | None] = [None] * n
    itl: list[list[float]] = [[] for _ in range(n)]
    outs: list[list[RequestOutput]] = [[] for _ in range(n)]
    outcome = "aborted"
    stream = None
    try:
        for i in range(n):
            head = chunks.head(i)
            if head is not None:
                yield sse(head)
        stream = fan_out(backend, prompt, params, served, rid)
        deadline = None if timeout is None else started + timeout
        finished = 0
        while True:
            try:
                if deadline is None:
                    i, out = await stream.__anext__()
                else:
                    i, out = await asyncio.wait_for(stream.__anext__(), max(0.0, deadline - time.monotonic()))
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
            outs[i].append(out)
            if out.error is not None:
                outcome = "error"
                yield sse(error_body(out.error))
                break
            now = time.monotonic()
            if first[i] is None:
                first[i] = now
            elif prev[i] is not None:
                itl[i].append(now - prev[i])
            prev[i] = now
            if out.new_text or out.finished:
                yield sse(chunks.piece(out, i))
            if out.finished:
                finished += 1
                if finished == n:
                    outcome = "ok"
        if outcome == "ok" and include_usage:
            yield sse(chunks.usage([o[-1] for o in outs]))
        yield DONE
    finally:
        ticket.release()
        for i in range(n):
            if outs[i] or i == 0:
                record(metrics, served, outs[i], started, first[i], itl[i], outcome)
        if stream is not None:  # closes every choice's engine stream (aborting what still runs)
            await stream.aclose()
