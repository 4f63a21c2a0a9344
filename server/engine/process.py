"""The engine in its own process, behind the API's ``EngineBackend`` protocol.

Why a process: in one process, the step loop and the HTTP event loop share the GIL, and every torch
op releases and retakes it; with the event loop busy streaming, the engine waits for the GIL after
each op. Measured on the 2-core dev machine (2026-11-23): a closed loop of 32 streams ran at 306
tok/s alone and at 204 tok/s beside one busy Python thread. So the engine runs in a child process
(the vLLM V1 split: API process, engine-core process) and the two talk over a pipe: commands in
(add, abort, calls), one message of outputs and stats out per step.

The API process keeps only the tokenizer (for chat templates and logprob token texts) and a reader
thread that hands each request's outputs to its asyncio queue.

Supervision: a failure inside a step ends that step's requests and the engine goes on (``Engine.step``).
If the child dies anyway (kill -9, the OOM killer, a crash in native code), the reader sees its pipe close
at once, ends every in-flight request and call with ``EngineUnavailableError`` (503, Retry-After), turns
``ready`` false (``/ready`` answers 503) and starts a new child, retrying with exponential backoff
(``restart_backoff``) until one is up; ``stats()["restarts"]`` counts them. New requests meanwhile get the
same 503 at once instead of waiting.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import pickle
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from loraplex.adapters.errors import EngineUnavailableError, LoraplexError

from .request import RequestOutput, SamplingParams, drain
from .text import TokenizerText

_STATS_EVERY = 0.25  # seconds between stats messages while idle
_LOADS_KEPT = 1024  # load durations the API process keeps for /metrics (a scrape observes the new ones)
log = logging.getLogger("loraplex.engine")


@dataclass(frozen=True, slots=True)
class EngineLaunch:
    """What the child needs to build the engine (all picklable)."""

    spec: object  # server.model.loader.ModelSpec
    config: object  # server.engine.engine.EngineConfig
    registry_uri: str | None
    cache_dir: str | None


def _safe_error(exc: BaseException) -> Exception:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc  # type: ignore[return-value]
    except Exception:
        return LoraplexError(str(exc) or type(exc).__name__)


def _take(items: list) -> list:
    """Empty ``items`` and return what it held."""
    out = list(items)
    items.clear()
    return out


def _engine_main(conn, launch: EngineLaunch, pins: tuple[str, ...] = ()) -> None:  # runs in the child process
    from loraplex.adapters import AdapterCache, AdapterRegistry

    from .engine import build_engine

    try:
        registry = AdapterRegistry(launch.registry_uri, cache=AdapterCache(launch.cache_dir)) if launch.registry_uri else None
        engine, loaded = build_engine(launch.spec, launch.config, registry)
    except BaseException as exc:
        conn.send(("fatal", _safe_error(exc)))
        return
    tok_dir = str(getattr(loaded, "path", "")) if loaded.tokenizer is not None else None
    conn.send(("ready", {"base_model": loaded.info.id, "max_model_len": engine.config.max_model_len,
                         "tokenizer": tok_dir, "load_seconds": loaded.load_seconds,
                         "base_info": loaded.info,
                         "resident_bytes": loaded.resident_bytes() + engine.decoder.packed_nbytes,
                         "attention": "paged kernel" if engine.decoder.paged else "gather + SDPA",
                         "linears": engine.decoder.linears}))
    pinned: set[str] = set()
    for name in pins:  # what the API pinned in an earlier child (a restart keeps pins)
        try:
            engine.adapters.pin(name)
            pinned.add(name)
        except Exception as exc:  # noqa: BLE001  e.g. removed from the registry since: serve without it
            log.warning("could not pin %s again after a restart: %s", name, exc)
    steps, last_batch, last_stats = 0, 0, 0.0

    def stats() -> dict:
        a = engine.adapters.stats
        s = engine.scheduler
        return {"running": len(s.running), "waiting": len(s.waiting), "kv_slots_used": len(s.running),
                "kv_slots_total": engine.config.max_running, "kv_blocks_used": engine.pool.used_blocks,
                "kv_blocks_total": engine.pool.total_blocks, "kv_blocks_cached": engine.pool.cached_blocks,
                "prefix_queries": engine.pool.queries, "prefix_hits": engine.pool.hits, "preemptions": s.preemptions,
                "prefix_by_adapter": {k: tuple(v) for k, v in s.prefix_by_adapter.items()},
                "batch_tokens": last_batch, "steps": steps,
                "cache_hits": a.hits, "cache_misses": a.misses, "loads": a.loads, "evictions": a.evictions,
                "load_seconds_new": _take(a.load_seconds)}  # only loads not reported before: a message stays small

    def call(method: str, args: tuple):
        if method == "add_merge":
            from ..lora.merge import MergeSpec

            sources, merge = args
            return engine.add_merge(sources, MergeSpec.from_request(merge))
        if method == "check_adapter":
            engine.bank.check(engine.adapters.loader(args[0]))
            return None
        if method == "pin":
            name, on = args
            if on and name not in pinned:
                engine.adapters.pin(name)
                pinned.add(name)
            elif not on and name in pinned:
                pinned.discard(name)
                engine.adapters.unpin(name)
            return None
        if method == "adapters":
            out = engine.adapters.resident()
            for name, info in out.items():
                info["pinned"] = name in pinned
            return out
        raise ValueError(f"unknown engine call {method!r}")

    while True:
        busy = engine.has_work()
        while True:
            try:
                if not conn.poll(0 if busy else 0.05):
                    break
                msg = conn.recv()
            except (EOFError, OSError):  # the API process is gone
                engine.adapters.shutdown()
                return
            kind = msg[0]
            if kind == "add":
                _, rid, prompt, params, adapters_ = msg
                try:
                    engine.add_request(prompt, params, adapters=adapters_, request_id=rid)
                except Exception as exc:
                    conn.send(("rejected", rid, _safe_error(exc)))
            elif kind == "abort":
                engine.abort(msg[1])
            elif kind == "call":
                _, cid, method, args = msg
                try:
                    conn.send(("reply", cid, True, call(method, args)))
                except Exception as exc:
                    conn.send(("reply", cid, False, _safe_error(exc)))
            elif kind == "stop":
                engine.adapters.shutdown()
                return
            busy = engine.has_work()
        if busy:
            outs = engine.step()
            steps += 1
            last_batch = sum(len(o.new_token_ids) for o in outs)
            for o in outs:
                if o.error is not None:
                    o.error = _safe_error(o.error)
            try:
                conn.send(("out", outs, stats()))
            except (BrokenPipeError, OSError):
                engine.adapters.shutdown()
                return
            if not engine.scheduler.running and engine.scheduler.waiting:
                time.sleep(0.002)  # only waiting on adapter loads
        if time.monotonic() - last_stats > _STATS_EVERY:
            last_stats = time.monotonic()
            try:
                conn.send(("stats", stats()))
            except (BrokenPipeError, OSError):
                engine.adapters.shutdown()
                return


class EngineProcess(TokenizerText):
    """``EngineBackend`` over an engine running in a child process, restarted when it dies."""

    def __init__(self, launch: EngineLaunch, start_timeout: float = 900.0,
                 restart_backoff: tuple[float, float] = (0.5, 30.0)) -> None:
        self._launch, self._start_timeout, self._backoff = launch, start_timeout, restart_backoff
        self._pinned: set[str] = set()  # what the API pinned: a restarted child pins them again
        self._conn, self._proc, info = self._spawn()  # the first start's failure is the caller's
        self.info = info
        self.base_model: str = info["base_model"]
        self.max_model_len: int = info["max_model_len"]
        self.tokenizer = None
        if info["tokenizer"]:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(info["tokenizer"])
        self._send_lock = threading.Lock()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._calls: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._ids = itertools.count()
        self.restarts = 0
        self._load_seconds: deque[float] = deque(maxlen=_LOADS_KEPT)  # the latest adapter loads' durations
        self._loads_timed = 0  # how many load durations all children together reported
        self._loads_lock = threading.Lock()
        self._stats: dict = self._idle_stats()
        self._up = True  # False from the child's death until its replacement is ready
        self._closed = False
        self._reader = threading.Thread(target=self._supervise, name="loraplex-engine-reader", daemon=True)
        self._reader.start()

    # ---- the child ----------------------------------------------------------------------------------
    def _spawn(self):
        """Start a child and wait for its "ready": (connection, process, info); raises if it fails to start."""
        ctx = mp.get_context("spawn")
        conn, child = ctx.Pipe()
        # Not a daemon, so it may start processes of its own; it exits by itself when this process
        # goes away (its end of the pipe then reads EOF).
        proc = ctx.Process(target=_engine_main, args=(child, self._launch, tuple(sorted(self._pinned))),
                           name="loraplex-engine", daemon=False)
        proc.start()
        child.close()
        if not conn.poll(self._start_timeout):
            proc.kill()
            raise LoraplexError("the engine process did not start in time")
        try:
            kind, info = conn.recv()
        except (EOFError, OSError):
            proc.join(5)
            raise LoraplexError(f"the engine process exited while starting (exit code {proc.exitcode})") from None
        if kind == "fatal":
            proc.join(5)
            raise info
        return conn, proc, info

    def _idle_stats(self) -> dict:
        return {"running": 0, "waiting": 0, "kv_slots_used": 0, "kv_slots_total": 1, "batch_tokens": 0, "steps": 0,
                "cache_hits": 0, "cache_misses": 0, "loads": 0, "evictions": 0, "restarts": self.restarts}

    @property
    def ready(self) -> bool:
        return self._up and not self._closed

    def _supervise(self) -> None:
        """Read the child's messages; when it dies, fail what was in flight and start a new one."""
        while True:
            self._read_loop(self._conn)
            if self._closed:
                return
            self._up = False
            self._fail_all(EngineUnavailableError("the engine stopped while serving this request and is restarting; "
                                                  "retry shortly"))
            self._proc.join(1)
            log.error("the engine process died (exit code %s); restarting it", self._proc.exitcode)
            delay = self._backoff[0]
            while not self._closed:
                try:
                    conn, proc, _ = self._spawn()
                except Exception as exc:  # noqa: BLE001  keep trying: the API stays up and answers 503
                    log.error("engine restart failed (%s); next try in %.1f s", exc, delay)
                    time.sleep(delay)
                    delay = min(delay * 2, self._backoff[1])
                    continue
                if self._closed:  # closed while this child started: stop it too
                    _stop(conn, proc)
                    return
                with self._send_lock:
                    self._conn, self._proc = conn, proc
                self.restarts += 1
                self._stats = self._idle_stats()
                self._up = True
                log.warning("engine process restarted (%d restart(s) so far)", self.restarts)
                break
            if self._closed:
                return

    # ---- plumbing -----------------------------------------------------------------------------------
    def _send(self, msg) -> None:
        if not self.ready:
            raise EngineUnavailableError("the engine is restarting; retry shortly")
        try:
            with self._send_lock:
                self._conn.send(msg)
        except (BrokenPipeError, OSError):
            raise EngineUnavailableError("the engine is restarting; retry shortly") from None

    def _read_loop(self, conn) -> None:
        """Deliver one child's messages until its pipe closes."""
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            kind = msg[0]
            if kind == "out":
                _, outs, stats = msg
                self._stats = self._merge_stats(stats)
                by_loop: dict = {}
                for out in outs:
                    target = self._streams.get(out.request_id)
                    if target is not None:
                        by_loop.setdefault(target[0], []).append((target[1], out))
                for loop, items in by_loop.items():
                    loop.call_soon_threadsafe(_deliver, items)
            elif kind == "stats":
                self._stats = self._merge_stats(msg[1])
            elif kind == "rejected":
                _, rid, exc = msg
                target = self._streams.get(rid)
                if target is not None:
                    target[0].call_soon_threadsafe(target[1].put_nowait, exc)
            elif kind == "reply":
                _, cid, ok, value = msg
                waiter = self._calls.pop(cid, None)
                if waiter is not None:
                    loop, fut = waiter
                    loop.call_soon_threadsafe(_settle, fut, ok, value)

    def _merge_stats(self, stats: dict) -> dict:
        """The child's stats plus what this process keeps across messages and restarts: the latest loads'
        durations with the count of all of them (the child sends only the new ones, so a step's message stays
        small however many loads there were; this process keeps a bounded window) and the restart count."""
        new = stats.pop("load_seconds_new", ())
        if new:
            with self._loads_lock:
                self._load_seconds.extend(new)
                self._loads_timed += len(new)
        return {**stats, "restarts": self.restarts}

    def _fail_all(self, exc: Exception) -> None:
        for loop, q in list(self._streams.values()):
            loop.call_soon_threadsafe(q.put_nowait, exc)
        for cid, (loop, fut) in list(self._calls.items()):
            self._calls.pop(cid, None)
            loop.call_soon_threadsafe(_settle, fut, False, exc)

    async def _call(self, method: str, *args):
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        cid = next(self._ids)
        self._calls[cid] = (loop, fut)
        try:
            self._send(("call", cid, method, args))
        except EngineUnavailableError:
            self._calls.pop(cid, None)
            raise
        return await fut

    # ---- EngineBackend --------------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams, adapters: list[tuple[str, float]],
                       request_id: str) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, queue)
        finished = False
        try:
            self._send(("add", request_id, prompt, params, list(adapters) or None))
            async for item in drain(queue):
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished and self.ready:
                try:
                    self._send(("abort", request_id))
                except EngineUnavailableError:
                    pass  # the child is gone, and the request with it

    def add_merge(self, sources: list[str], merge: dict) -> str:
        return _run_sync(self._call("add_merge", sources, merge))

    def check_adapter(self, name: str) -> None:
        _run_sync(self._call("check_adapter", name))

    async def pin(self, name: str, pinned: bool) -> None:
        await self._call("pin", name, pinned)
        (self._pinned.add if pinned else self._pinned.discard)(name)

    async def adapters(self) -> dict[str, dict]:
        return await self._call("adapters")

    def stats(self) -> dict:
        with self._loads_lock:
            return {**self._stats, "load_seconds": list(self._load_seconds), "load_seconds_count": self._loads_timed}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True  # first: the supervisor must not take the child's exit for a crash
        try:
            with self._send_lock:
                self._conn.send(("stop",))
        except OSError:
            pass
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()


def _stop(conn, proc) -> None:
    try:
        conn.send(("stop",))
    except OSError:
        pass
    proc.join(10)
    if proc.is_alive():
        proc.kill()


def _run_sync(coro):
    """For the sync protocol methods the app calls from its thread pool: run on a private loop."""
    return asyncio.run(coro)


def _deliver(items: list) -> None:
    for queue, out in items:
        queue.put_nowait(out)


def _settle(fut: asyncio.Future, ok: bool, value) -> None:
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)
