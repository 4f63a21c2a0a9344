"""``EngineBackend`` on vLLM's ``AsyncLLM`` (V1): ``loraplex serve --engine vllm``.

vLLM already runs its engine core (scheduler, model) in processes of its own; what stays in the API
process is its input and output processing (tokenizer, detokenizer), driven by an asyncio loop. That loop
is a private one on a thread of its own, so the backend serves callers on any loop or thread (the app's
event loop, its thread pool, tests) and every vLLM call happens on one loop. Outputs cross back to the
caller's loop with ``call_soon_threadsafe``; a caller that stops iterating cancels the request's task
on the vLLM loop, which aborts the request in vLLM.

What vLLM cannot do per request is done before it sees the request (see ``catalog.py``): adapters are
fetched and checked against the base, and mixtures and merges become derived adapter folders.
What it cannot tell is reported as unknown (None): adapter-cache hits, misses, loads, evictions, load
times, and which device slot an adapter holds.

Supervision, as the native engine's (``server.engine.process``): a watcher thread checks ``AsyncLLM.errored``
every 0.25 s. When vLLM's engine core dies (kill -9, the OOM killer, a crash), ``ready`` turns False at once
(``/ready`` answers 503), every in-flight request and engine call ends with ``EngineUnavailableError`` (503,
Retry-After; vLLM would leave a pending engine call waiting forever), the dead ``AsyncLLM`` is shut down (its
processes with it) and a new one is built in the watcher's thread, so the vLLM loop keeps answering meanwhile;
failed starts are retried with exponential backoff (``restart_backoff``). Pins are applied again to the new
engine before it serves; ``stats()["restarts"]`` counts the restarts. While the engine is down, ``generate``
and ``pin`` raise ``EngineUnavailableError`` at once and ``adapters()`` is empty.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from loraplex.adapters import AdapterRegistry, BaseModelInfo
from loraplex.adapters.errors import ConfigError, EngineError, EngineUnavailableError, LoraplexError

from ..engine.request import RequestOutput, SamplingParams, drain
from ..engine.text import TokenizerText
from .catalog import AdapterCatalog, CheckedAdapter
from .derived import DerivedStore
from .launch import VllmLaunch
from .output import OutputStream
from .sampling import to_vllm
from .stats import VllmStats, stat_logger

log = logging.getLogger("loraplex.vllm")


_RESTARTING = "the vLLM engine is restarting; retry shortly"
_WATCH_EVERY = 0.25  # seconds between checks of the engine's health


class VllmBackend(TokenizerText):
    """The API's engine, on vLLM."""

    def __init__(self, launch: VllmLaunch, base: BaseModelInfo, registry: AdapterRegistry | None,
                 derived_dir: Path, max_derived: int = 64, restart_backoff: tuple[float, float] = (0.5, 30.0)) -> None:
        from transformers import AutoTokenizer

        started = time.perf_counter()
        self.launch = launch
        self.base_model: str = base.id
        self.max_model_len: int = launch.max_model_len or 0  # vLLM's own once it has started (the model's when unset)
        self.vocab_size = base.vocab_size
        self.tokenizer = AutoTokenizer.from_pretrained(str(launch.model))
        self.catalog = AdapterCatalog(registry, base, launch.max_lora_rank, DerivedStore(derived_dir, base.id),
                                      max_derived=max_derived, on_evict=self._evicted)
        self._backoff = restart_backoff
        self._stats = VllmStats()
        # On the vLLM loop: request id -> its adapter's engine name (None: base), and its task and output sink.
        self._inflight: dict[str, str | None] = {}
        self._pumps: dict[str, tuple[asyncio.Task, Callable]] = {}
        self._pinned: dict[str, CheckedAdapter] = {}  # engine name -> the pinned adapter (held in the catalog)
        self.restarts = 0
        self._up = False  # False from the engine core's death until its successor serves
        self._closed = False
        self._wake = threading.Event()  # set by close(): the watcher stops waiting
        self._engine = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="loraplex-vllm", daemon=True)
        self._thread.start()
        try:
            self._engine = self._on_loop(self._start()).result()
        except Exception as exc:  # vLLM's own message, on one line (its log above has the details)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self.catalog.derived.close()
            first = (str(exc).splitlines() or [""])[0]
            raise ConfigError(f"vLLM could not start the engine for {launch.model}: {type(exc).__name__}: {first}") from exc
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self.catalog.derived.close()
            raise
        self._up = True
        self._watcher = threading.Thread(target=self._supervise, name="loraplex-vllm-watcher", daemon=True)
        self._watcher.start()
        self.max_model_len = int(self._engine.model_config.max_model_len)
        self.info = {"base_model": base.id, "max_model_len": self.max_model_len, "base_info": base,
                     "load_seconds": time.perf_counter() - started, "resident_bytes": None}

    async def _start(self):
        self._dead = asyncio.get_running_loop().create_future()  # set when this engine dies: pending calls end
        return self._build()

    def _build(self):
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(self.launch.engine_args(), stat_loggers=[stat_logger(self._stats)])

    def _on_loop(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _call(self, coro):
        """Await a coroutine that runs on the vLLM loop, from any loop."""
        return await asyncio.wrap_future(self._on_loop(coro))

    # ---- supervision ------------------------------------------------------------------------------------
    def _supervise(self) -> None:
        """The watcher thread: when the engine core dies, fail what was in flight and start a new engine."""
        while not self._wake.wait(_WATCH_EVERY):
            engine = self._engine
            if engine is None or not engine.errored:
                continue
            self._up = False
            log.error("the vLLM engine core died; restarting it")
            try:
                self._on_loop(self._fail_inflight()).result(10)
            except Exception:  # noqa: BLE001  the loop is stopping (close) or stuck: the requests end with it
                log.exception("ending the requests of the dead vLLM engine")
            _reset(self._stats)
            _shutdown(engine)
            del engine
            if not self._revive():
                return

    def _revive(self) -> bool:
        """Start a new ``AsyncLLM`` and serve with it, retrying with backoff until one serves; False if the
        backend is closed first. Built here, off the vLLM loop, which keeps answering meanwhile (vLLM starts
        its loop tasks on the loop of the first call)."""
        delay = self._backoff[0]
        while not self._closed:
            new = None
            try:
                new = self._build()
                if not self._closed:
                    self._on_loop(self._adopt(new)).result(120)
            except Exception as exc:  # noqa: BLE001  keep trying: the API stays up and answers 503
                log.error("vLLM engine restart failed (%s: %s); next try in %.1f s", type(exc).__name__,
                          (str(exc).splitlines() or [""])[0], delay)
                if new is not None:
                    _shutdown(new)
                self._wake.wait(delay)
                delay = min(delay * 2, self._backoff[1])
                continue
            if self._closed:  # closed while it started: stop it too
                _shutdown(new)
                return False
            self.restarts += 1
            self._up = True
            log.warning("vLLM engine restarted (%d restart(s) so far)", self.restarts)
            return True
        return False

    async def _fail_inflight(self) -> None:
        """On the vLLM loop: end every request and pending engine call of the dead engine with a 503."""
        if not self._dead.done():
            self._dead.set_result(None)
        for task, push in list(self._pumps.values()):
            push(EngineUnavailableError("the vLLM engine stopped while serving this request and is restarting; "
                                        "retry shortly"))
            task.cancel()

    async def _adopt(self, engine) -> None:
        """On the vLLM loop: serve with ``engine``, the pinned adapters pinned again first (one that fails for
        another reason than the engine's death is dropped, with a warning)."""
        self._engine, self._dead = engine, asyncio.get_running_loop().create_future()
        for name, checked in list(self._pinned.items()):
            lora = self.catalog.lora_request(checked)
            try:
                await self._engine_call(lambda e, lora=lora: e.add_lora(lora))
                await self._engine_call(lambda e, lora=lora: e.pin_lora(lora.lora_int_id))
            except EngineUnavailableError:
                raise
            except Exception as exc:  # noqa: BLE001
                log.warning("adapter %s could not be pinned again after the restart: %s", name, exc)
                self.catalog.release(self._pinned.pop(name))

    async def _engine_call(self, call: Callable):
        """On the vLLM loop: ``call(engine)``, ending with ``EngineUnavailableError`` if the engine dies first."""
        engine, dead = self._engine, self._dead
        if engine is None or dead.done():
            raise EngineUnavailableError(_RESTARTING)
        task = asyncio.ensure_future(call(engine))
        try:
            await asyncio.wait({task, dead}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not task.done():
            task.cancel()
            raise EngineUnavailableError(_RESTARTING)
        try:
            return task.result()
        except Exception as exc:
            raise _engine_error(exc) from exc

    def _check_up(self) -> None:
        if self._closed:
            raise EngineError("the vLLM engine is shut down")
        if not self.ready:
            raise EngineUnavailableError(_RESTARTING)

    def _evicted(self, lora_int_id: int) -> None:
        """The catalog dropped a derived adapter: drop it from vLLM's caches too (the engine loaded it, if it
        did, from the folder that is now gone)."""
        if not self.ready:
            return  # a restarted engine never had it

        def done(fut: concurrent.futures.Future) -> None:
            if not fut.cancelled() and fut.exception() is not None:
                log.warning("removing lora %d from vLLM: %s", lora_int_id, fut.exception())

        try:
            self._on_loop(self._engine_call(lambda e: e.remove_lora(lora_int_id))).add_done_callback(done)
        except RuntimeError:  # the loop is closed
            pass

    # ---- EngineBackend ----------------------------------------------------------------------------------
    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        # As the native engine: a text prompt is encoded without added special tokens (chat templates
        # carry their own), and the same limits apply, with the same messages.
        ids = list(self.tokenizer.encode(prompt, add_special_tokens=False)) if isinstance(prompt, str) \
            else [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if len(ids) + 1 > self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; this engine allows at most {self.max_model_len - 1}")
        return ids

    async def generate(self, prompt: str | list[int], params: SamplingParams, adapters: list[tuple[str, float]],
                       request_id: str) -> AsyncIterator[RequestOutput]:
        self._check_up()
        ids = self._prompt_ids(prompt)
        if any(t >= self.vocab_size for t, _ in params.logit_bias):  # (the native engine's check and message)
            raise ValueError(f"logit_bias token ids must be in [0, {self.vocab_size})")
        checked = await self._resolve_held(adapters)
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def push(item) -> None:
            try:
                caller.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed: nobody reads this request any more
                pass

        try:
            lora = self.catalog.lora_request(checked) if checked is not None else None
            stream = OutputStream(request_id, len(ids), tuple((n, float(w)) for n, w in adapters), params.logprobs,
                                  params.prompt_logprobs)
            self._loop.call_soon_threadsafe(self._start_pump, ids, params.cache_salt, to_vllm(params), lora, checked,
                                            request_id, stream, push)
        except BaseException as exc:
            self.catalog.release(checked)
            if isinstance(exc, RuntimeError):  # the loop is stopped: closed meanwhile
                raise EngineError("the vLLM engine is shut down") from None
            raise
        finished = False
        try:
            async for item in drain(queue):
                finished = item.finished
                yield item
        finally:
            if not finished:  # cancels the vLLM-side task: vLLM's generate() aborts the request
                try:
                    self._loop.call_soon_threadsafe(self._cancel_pump, request_id)
                except RuntimeError:
                    pass

    async def _resolve_held(self, adapters: list[tuple[str, float]]) -> CheckedAdapter | None:
        """The request's adapter, held (a derived one is not evicted, its folder not deleted) until the request
        ends in vLLM; a caller that gives up meanwhile lets go of it once it is resolved."""
        fut = asyncio.ensure_future(asyncio.to_thread(self.catalog.resolve, list(adapters), True))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            def let_go(f: asyncio.Future) -> None:
                if not f.cancelled() and f.exception() is None:
                    self.catalog.release(f.result())

            fut.add_done_callback(let_go)
            raise

    def _start_pump(self, ids, salt, params, lora, checked, request_id: str, stream: OutputStream, push) -> None:
        """On the vLLM loop: start the request's task; when it ends, however, its adapter hold is released
        (only then: an aborted request is aborted in vLLM before its adapter may be evicted)."""
        task = self._loop.create_task(self._pump(ids, salt, params, lora, request_id, stream, push))
        self._inflight[request_id] = lora.lora_name if lora is not None else None
        self._pumps[request_id] = (task, push)

        def ended(_task) -> None:
            if self._pumps.get(request_id, (None,))[0] is task:  # not a later request that took the same id
                self._inflight.pop(request_id, None)
                self._pumps.pop(request_id, None)
            self.catalog.release(checked)

        task.add_done_callback(ended)

    def _cancel_pump(self, request_id: str) -> None:
        entry = self._pumps.get(request_id)
        if entry is not None:
            entry[0].cancel()

    async def _pump(self, ids: list[int], salt: str | None, params, lora, request_id: str, stream: OutputStream,
                    push) -> None:
        """On the vLLM loop: run one request, handing each converted output to ``push``."""
        engine = self._engine
        if not self._up or engine is None:
            push(EngineUnavailableError(_RESTARTING))
            return
        prompt = {"prompt_token_ids": ids}
        if salt is not None:  # vLLM mixes it into the first block's hash: no cached block is shared across salts
            prompt["cache_salt"] = salt
        try:
            async for out in engine.generate(prompt, params, request_id, lora_request=lora):
                push(stream.convert(out))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            push(_engine_error(exc))

    def add_merge(self, sources: list[str], merge: dict) -> str:
        return self.catalog.add_merge(sources, merge)

    def check_adapter(self, name: str) -> None:
        self.catalog.check(name)

    async def pin(self, name: str, pinned: bool) -> None:
        """vLLM pins an adapter in its host cache and a device slot; it has no unpin, so unpinning
        removes the adapter from vLLM's caches (the next request that needs it loads it again). A pinned
        adapter is pinned again in an engine that restarted."""
        self._check_up()
        checked = await asyncio.to_thread(self.catalog.check, name, pinned)  # a pin holds a derived adapter
        lora = self.catalog.lora_request(checked)

        async def apply() -> None:  # on the vLLM loop, as _adopt, which reads the pins
            if pinned:
                await self._engine_call(lambda e: e.add_lora(lora))
                await self._engine_call(lambda e: e.pin_lora(lora.lora_int_id))
            else:
                await self._engine_call(lambda e: e.remove_lora(lora.lora_int_id))
            old = self._pinned.pop(checked.name, None)
            if pinned:
                self._pinned[checked.name] = checked
            self.catalog.release(old)

        try:
            await self._call(apply())
        except BaseException:
            if pinned:
                self.catalog.release(checked)
            raise

    async def adapters(self) -> dict[str, dict]:
        """Adapters in vLLM's adapter cache (tier ``host``; a pinned one also holds a device slot, tier
        ``device``). vLLM does not say which slot, nor how long a load took: those are None. Empty while the
        engine restarts."""
        if not self.ready:
            return {}
        try:
            ids = await self._call(self._engine_call(lambda e: e.list_loras()))
        except EngineUnavailableError:
            return {}
        names = self.catalog.names_by_id()
        refs = Counter(n for n in list(self._inflight.values()) if n is not None)
        out = {}
        for lid in sorted(ids):
            name = names.get(lid, f"lora-{lid}")
            out[name] = {"tier": "device" if name in self._pinned else "host", "slot": None, "refs": refs.get(name, 0),
                         "pinned": name in self._pinned, "load_seconds": None, "lora_int_id": lid}
        return out

    @property
    def ready(self) -> bool:
        """False while vLLM's engine core is dead or restarting (``AsyncLLM.errored``), and once closed."""
        engine = self._engine if self._up else None
        return not self._closed and engine is not None and not engine.errored

    def stats(self) -> dict:
        s = self._stats
        with s.lock:
            return {"running": s.running, "waiting": s.waiting, "in_flight": len(self._inflight),
                    "kv_slots_used": s.running, "kv_slots_total": self.launch.max_running,
                    "kv_cache_usage": s.kv_cache_usage, "batch_tokens": s.batch_tokens, "steps": s.steps,
                    "running_adapters": dict(s.running_adapters), "restarts": self.restarts,
                    "cache_hits": None, "cache_misses": None, "loads": None, "evictions": None, "load_seconds": []}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True  # first: the watcher must not take the engine's shutdown for a death
        self._wake.set()
        self._watcher.join(120)  # a restart under way stops its new engine itself
        if self._watcher.is_alive():
            log.warning("a vLLM engine restart is still under way; it stops its engine once started")
        engine, self._engine = self._engine, None

        async def stop() -> None:
            for task, _ in list(self._pumps.values()):
                task.cancel()
            if engine is not None:
                _shutdown(engine)

        try:
            self._on_loop(stop()).result(60)
        except Exception:  # already gone
            log.exception("stopping the vLLM engine")
        del engine  # collected here, not at interpreter exit (where its __del__ fails)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self.catalog.derived.close()


def _shutdown(engine) -> None:
    """Stop an ``AsyncLLM`` and its engine-core processes (bounded: vLLM kills what does not stop in time)."""
    try:
        engine.shutdown(timeout=10)
    except Exception:  # noqa: BLE001  a dead engine may fail parts of its shutdown; its processes are gone
        log.exception("shutting the vLLM engine down")


def _reset(stats: VllmStats) -> None:
    """The dead engine's last numbers are not the new one's."""
    with stats.lock:
        stats.running = stats.waiting = stats.batch_tokens = 0
        stats.kv_cache_usage = 0.0
        stats.running_adapters = {}


def _engine_error(exc: Exception) -> Exception:
    """vLLM's request errors as loraplex's: its validation errors are 400s, anything else a 500."""
    if isinstance(exc, (LoraplexError, ValueError)):
        return exc
    cause = exc.__cause__ or exc
    if type(exc).__name__ == "EngineDeadError" or type(cause).__name__ == "EngineDeadError":
        return EngineUnavailableError("the vLLM engine stopped; retry shortly")
    if isinstance(cause, ValueError):
        return ValueError(str(cause).splitlines()[0] if str(cause) else "invalid request")
    return EngineError(f"the vLLM engine failed: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}")
