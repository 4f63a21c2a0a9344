"""The engine on its own thread, streaming each request's output to an asyncio consumer.

The step loop runs on one thread that owns the engine; callers talk to it through a command
queue (add, abort), and each request's outputs come back through its own asyncio queue. A
consumer that goes away (client disconnect, cancellation) aborts its request at once, which frees
its KV slot and adapter reference at the next step boundary.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .engine import Engine
from .sampling import SamplingParams
from .sequence import RequestOutput


@dataclass(slots=True)
class EngineStats:
    running: int
    waiting: int
    kv_slots_used: int
    kv_slots_total: int
    last_batch_tokens: int
    steps: int


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._steps = 0
        self._last_batch = 0
        self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)
        self._thread.start()

    # ---- caller side ---------------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams, *, adapters=None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        request_id = request_id or f"areq-{next(self._ids)}"
        stream: asyncio.Queue = asyncio.Queue()
        added: asyncio.Future = loop.create_future()
        self._streams[request_id] = (loop, stream)
        self._commands.put(("add", (prompt, params, adapters, request_id), (loop, added)))
        finished = False
        try:
            await added  # raises the engine's ValueError for a bad request
            while True:
                out: RequestOutput = await stream.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None))

    async def call(self, fn):
        """Run fn() on the engine thread between two steps (the engine is not thread-safe)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._commands.put(("call", fn, (loop, fut)))
        return await fut

    def stats(self) -> EngineStats:
        s = self.engine.scheduler
        return EngineStats(len(s.running), len(s.waiting), len(s.running), self.engine.config.max_running,
                           self._last_batch, self._steps)

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(("wake", None, None))
        self._thread.join(10)
        self.engine.adapters.shutdown()

    # ---- engine thread --------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            idle = not self.engine.has_work()
            try:
                cmd = self._commands.get(timeout=0.1) if idle else self._commands.get_nowait()
            except queue.Empty:
                cmd = None
            while cmd is not None:
                self._run(cmd)
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if not self.engine.has_work():
                continue
            outputs = self.engine.step()
            self._steps += 1
            self._last_batch = sum(len(o.new_token_ids) for o in outputs)
            by_loop: dict = {}
            for out in outputs:  # one wake-up per event loop per step, not one per token
                target = self._streams.get(out.request_id)
                if target is not None:
                    by_loop.setdefault(target[0], []).append((target[1], out))
            for loop, items in by_loop.items():
                loop.call_soon_threadsafe(_deliver, items)
            if not self.engine.scheduler.running and self.engine.scheduler.waiting:
                self._stop.wait(0.002)  # only waiting on adapter loads: do not spin

    def _run(self, cmd) -> None:
        kind, arg, reply = cmd
        if kind == "add":
            prompt, params, adapters, request_id = arg
            loop, fut = reply
            try:
                self.engine.add_request(prompt, params, adapters=adapters, request_id=request_id)
            except Exception as exc:  # a bad request: hand the error to its caller
                loop.call_soon_threadsafe(_set_exception, fut, exc)
            else:
                loop.call_soon_threadsafe(_set_result, fut, None)
        elif kind == "abort":
            self.engine.abort(arg)
        elif kind == "call":
            loop, fut = reply
            try:
                result = arg()
            except Exception as exc:
                loop.call_soon_threadsafe(_set_exception, fut, exc)
            else:
                loop.call_soon_threadsafe(_set_result, fut, result)


def _deliver(items: list) -> None:
    for stream, out in items:
        stream.put_nowait(out)


def _set_result(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: Exception) -> None:
    if not fut.done():
        fut.set_exception(exc)
