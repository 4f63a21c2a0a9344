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
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

from loraplex.adapters import AdapterRegistry, BaseModelInfo
from loraplex.adapters.errors import ConfigError, EngineError, EngineUnavailableError, LoraplexError

from ..engine.request import RequestOutput, SamplingParams, drain
from .catalog import AdapterCatalog
from .derived import DerivedStore
from .launch import VllmLaunch
from .output import OutputStream
from .sampling import to_vllm
from .stats import VllmStats, stat_logger

log = logging.getLogger("loraplex.vllm")


class VllmBackend:
    """The API's engine, on vLLM."""

    def __init__(self, launch: VllmLaunch, base: BaseModelInfo, registry: AdapterRegistry | None,
                 derived_dir: Path) -> None:
        from transformers import AutoTokenizer

        started = time.perf_counter()
        self.launch = launch
        self.base_model: str = base.id
        self.max_model_len: int = launch.max_model_len
        self.vocab_size = base.vocab_size
        self.tokenizer = AutoTokenizer.from_pretrained(str(launch.model))
        self.catalog = AdapterCatalog(registry, base, launch.max_lora_rank, DerivedStore(derived_dir, base.id))
        self._stats = VllmStats()
        self._inflight: dict[str, str | None] = {}  # request id -> its adapter's engine name (None: base)
        self._pinned: set[str] = set()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="loraplex-vllm", daemon=True)
        self._thread.start()
        try:
            self._engine = self._on_loop(self._start()).result()
        except Exception as exc:  # vLLM's own message, on one line (its log above has the details)
            self._loop.call_soon_threadsafe(self._loop.stop)
            first = (str(exc).splitlines() or [""])[0]
            raise ConfigError(f"vLLM could not start the engine for {launch.model}: {type(exc).__name__}: {first}") from exc
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise
        self.info = {"base_model": base.id, "max_model_len": launch.max_model_len, "base_info": base,
                     "load_seconds": time.perf_counter() - started, "resident_bytes": None}

    async def _start(self):
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(self.launch.engine_args(), stat_loggers=[stat_logger(self._stats)])

    def _on_loop(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _call(self, coro):
        """Await a coroutine that runs on the vLLM loop, from any loop."""
        return await asyncio.wrap_future(self._on_loop(coro))

    # ---- EngineBackend ----------------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this base model has no chat template: use /v1/completions")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

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
        if self._closed:
            raise EngineError("the vLLM engine is shut down")
        ids = self._prompt_ids(prompt)
        checked = await asyncio.to_thread(self.catalog.resolve, list(adapters))
        lora = self.catalog.lora_request(checked) if checked is not None else None
        stream = OutputStream(request_id, len(ids), tuple((n, float(w)) for n, w in adapters), params.logprobs)
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def push(item) -> None:
            try:
                caller.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed: nobody reads this request any more
                pass

        task = self._on_loop(self._pump(ids, to_vllm(params), lora, request_id, stream, push))
        finished = False
        try:
            async for item in drain(queue):
                finished = item.finished
                yield item
        finally:
            if not finished:
                task.cancel()  # cancels the vLLM-side task: vLLM's generate() aborts the request

    async def _pump(self, ids: list[int], params, lora, request_id: str, stream: OutputStream, push) -> None:
        """On the vLLM loop: run one request, handing each converted output to ``push``."""
        self._inflight[request_id] = lora.lora_name if lora is not None else None
        try:
            async for out in self._engine.generate({"prompt_token_ids": ids}, params, request_id, lora_request=lora):
                push(stream.convert(out))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            push(_engine_error(exc))
        finally:
            self._inflight.pop(request_id, None)

    def add_merge(self, sources: list[str], merge: dict) -> str:
        return self.catalog.add_merge(sources, merge)

    def check_adapter(self, name: str) -> None:
        self.catalog.check(name)

    async def pin(self, name: str, pinned: bool) -> None:
        """vLLM pins an adapter in its host cache and a device slot; it has no unpin, so unpinning
        removes the adapter from vLLM's caches (the next request that needs it loads it again)."""
        checked = await asyncio.to_thread(self.catalog.check, name)
        lora = self.catalog.lora_request(checked)

        async def apply() -> None:
            if pinned:
                await self._engine.add_lora(lora)
                await self._engine.pin_lora(lora.lora_int_id)
            else:
                await self._engine.remove_lora(lora.lora_int_id)

        await self._call(apply())
        (self._pinned.add if pinned else self._pinned.discard)(checked.name)

    async def adapters(self) -> dict[str, dict]:
        """Adapters in vLLM's adapter cache (tier ``host``; a pinned one also holds a device slot, tier
        ``device``). vLLM does not say which slot, nor how long a load took: those are None."""
        ids = await self._call(self._engine.list_loras())
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
        """False once vLLM's engine core has died (``AsyncLLM.errored``) or the backend is closed."""
        engine = getattr(self, "_engine", None)
        return not self._closed and engine is not None and not getattr(engine, "errored", False)

    def stats(self) -> dict:
        s = self._stats
        with s.lock:
            return {"running": s.running, "waiting": s.waiting, "in_flight": len(self._inflight),
                    "kv_slots_used": s.running, "kv_slots_total": self.launch.max_running,
                    "kv_cache_usage": s.kv_cache_usage, "batch_tokens": s.batch_tokens, "steps": s.steps,
                    "running_adapters": dict(s.running_adapters),
                    "cache_hits": None, "cache_misses": None, "loads": None, "evictions": None, "load_seconds": []}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        async def stop() -> None:
            engine, self._engine = self._engine, None
            engine.shutdown()
            del engine  # collected here, not at interpreter exit (where its __del__ fails)

        try:
            self._on_loop(stop()).result(60)
        except Exception:  # already gone
            log.exception("stopping the vLLM engine")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


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
