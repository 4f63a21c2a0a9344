"""Prometheus metrics of the server, in a per-instance registry, and a reader for ``loraplex route show``.

Plain Python (no FastAPI, no torch). The app makes one :class:`Metrics` and calls:

* per request, once it knows the outcome: :meth:`Metrics.observe_request` (or use
  :meth:`Metrics.start_request`, a timer that measures TTFT, inter-token and end-to-end latency);
* before answering ``GET /metrics`` (or periodically): :meth:`Metrics.set_engine` with the engine's
  stats and :meth:`Metrics.set_adapter_cache` / :meth:`Metrics.update_adapter_cache` with the adapter
  manager's cumulative counters;
* :meth:`Metrics.render` for the body and content type of ``GET /metrics``.

Metric names and labels (``loraplex route show`` and dashboards rely on them)::

    loraplex_requests_total{adapter, version, outcome}   outcome: ok | error | aborted | rejected
    loraplex_prompt_tokens_total{adapter, version}
    loraplex_generation_tokens_total{adapter, version}
    loraplex_ttft_seconds{adapter}                        histogram
    loraplex_inter_token_seconds{adapter}                 histogram
    loraplex_e2e_seconds{adapter, version}                histogram, outcome ok only
    loraplex_queue_depth, loraplex_running_requests, loraplex_batch_tokens,
    loraplex_kv_slots_used, loraplex_kv_slots_total      gauges (sequences running, and at most)
    loraplex_kv_blocks_used, loraplex_kv_blocks_total    gauges (native engine: the paged KV pool)
    loraplex_preemptions_total                           counter (sequences sent back to recompute)
    loraplex_kv_blocks_cached                            gauge (blocks kept for prefix reuse)
    loraplex_prefix_cache_queried_tokens_total{adapter}, loraplex_prefix_cache_hit_tokens_total{adapter}
                                                         counters (prompt tokens looked up, and found cached)
    loraplex_adapter_cache_hits_total, loraplex_adapter_cache_misses_total,
    loraplex_adapter_loads_total, loraplex_adapter_evictions_total   counters
    loraplex_adapter_load_seconds                         histogram

The base model is ``adapter="base", version=""``.

Label cardinality is bounded: the first ``max_adapters`` (default 50) distinct adapter names seen
keep their own ``adapter`` label for the life of the process; later ones are reported as
``adapter="other", version=""``. Likewise the first ``max_versions`` (default 10) versions of an
adapter keep their own ``version`` label, later ones become ``version="other"``. ``base`` and
``other`` never take a place. Pass only adapter names that resolved to a real adapter: a request for
an unknown model should be recorded as ``adapter="other"`` (or not at all), else any client could
use up the places with made-up names.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BASE = "base"
OTHER = "other"
OUTCOMES = ("ok", "error", "aborted", "rejected")

# Latency buckets for a CPU server.
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0)
INTER_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0)
ADAPTER_LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# set_engine: gauge <- the first key of the stats that is present
_ENGINE_GAUGES = {
    "queue_depth": ("queue_depth", "waiting"),
    "running_requests": ("running_requests", "running"),
    "batch_tokens": ("batch_tokens", "last_batch_tokens"),
    "kv_slots_used": ("kv_slots_used",),
    "kv_slots_total": ("kv_slots_total",),
    "kv_blocks_used": ("kv_blocks_used",),
    "kv_blocks_total": ("kv_blocks_total",),
    "kv_blocks_cached": ("kv_blocks_cached",),
}


class Metrics:
    def __init__(self, max_adapters: int = 50, max_versions: int = 10, registry: CollectorRegistry | None = None) -> None:
        if max_adapters < 0 or max_versions < 0:
            raise ValueError("max_adapters and max_versions must be >= 0")
        self.max_adapters = max_adapters
        self.max_versions = max_versions
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()
        self._versions: dict[str, set[str]] = {}  # adapter label -> version labels it keeps
        self._totals: dict[str, float] = {}  # last cumulative value seen per counter
        self._load_seconds_seen = 0
        r = self.registry

        av = ["adapter", "version"]
        self.requests = Counter("loraplex_requests_total", "Finished requests by adapter, version and outcome "
                                "(ok, error, aborted by the client, rejected before running).", av + ["outcome"], registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens_total", "Prompt tokens processed.", av, registry=r)
        self.generation_tokens = Counter("loraplex_generation_tokens_total", "Tokens generated.", av, registry=r)
        self.ttft = Histogram("loraplex_ttft_seconds", "Time to first token.", ["adapter"], buckets=TTFT_BUCKETS, registry=r)
        self.inter_token = Histogram("loraplex_inter_token_seconds", "Time between generated tokens.", ["adapter"],
                                     buckets=INTER_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("loraplex_e2e_seconds", "End-to-end latency of successful requests.", av,
                             buckets=E2E_BUCKETS, registry=r)
        self.queue_depth = Gauge("loraplex_queue_depth", "Requests waiting to be scheduled.", registry=r)
        self.running_requests = Gauge("loraplex_running_requests", "Requests in the running batch.", registry=r)
        self.batch_tokens = Gauge("loraplex_batch_tokens", "Tokens produced by the last engine step.", registry=r)
        self.kv_slots_used = Gauge("loraplex_kv_slots_used", "Sequences running (each holds KV cache).", registry=r)
        self.kv_slots_total = Gauge("loraplex_kv_slots_total", "Sequences that may run at once.", registry=r)
        self.kv_blocks_used = Gauge("loraplex_kv_blocks_used", "KV cache blocks held by running sequences.", registry=r)
        self.kv_blocks_total = Gauge("loraplex_kv_blocks_total", "KV cache blocks in the pool.", registry=r)
        self.kv_blocks_cached = Gauge("loraplex_kv_blocks_cached", "KV cache blocks kept for prefix reuse.",
                                      registry=r)
        self.prefix_queried = Counter("loraplex_prefix_cache_queried_tokens", "Prompt tokens looked up in the "
                                      "prefix cache.", ["adapter"], registry=r)
        self.prefix_hits = Counter("loraplex_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache "
                                   "(not computed again).", ["adapter"], registry=r)
        self.preemptions = Counter("loraplex_preemptions_total", "Running sequences that gave their KV blocks back "
                                   "(to be computed again) because the pool ran out.", registry=r)
        self.adapter_cache_hits = Counter("loraplex_adapter_cache_hits_total", "Adapter lookups served from a resident slot.", registry=r)
        self.adapter_cache_misses = Counter("loraplex_adapter_cache_misses_total", "Adapter lookups that started a load.", registry=r)
        self.adapter_loads = Counter("loraplex_adapter_loads_total", "Adapters loaded.", registry=r)
        self.adapter_evictions = Counter("loraplex_adapter_evictions_total", "Adapters evicted from a slot.", registry=r)
        self.registry_stale = Counter("loraplex_registry_stale_resolutions_total",
                                      "Adapter resolutions served from the last known state while the registry failed.",
                                      registry=r)
        self.engine_restarts = Counter("loraplex_engine_restarts_total", "Times the engine died and was restarted.",
                                       registry=r)
        self.adapter_load_seconds = Histogram("loraplex_adapter_load_seconds", "Time to load an adapter.",
                                              buckets=ADAPTER_LOAD_BUCKETS, registry=r)

    # ---- labels ---------------------------------------------------------------------------------------
    def labels(self, adapter: str | None, version: Any = None) -> tuple[str, str]:
        """The bounded ``(adapter, version)`` labels for a request on ``adapter`` (None: the base model)."""
        if adapter is None or adapter == BASE:
            return BASE, ""
        adapter = str(adapter)
        version = "" if version is None else str(version)
        with self._lock:
            if adapter == OTHER:
                return OTHER, ""
            versions = self._versions.get(adapter)
            if versions is None:
                if len(self._versions) >= self.max_adapters:
                    return OTHER, ""
                versions = self._versions[adapter] = set()
            if version and version not in versions:
                if len(versions) >= self.max_versions:
                    return adapter, OTHER
                versions.add(version)
            return adapter, version

    # ---- requests -------------------------------------------------------------------------------------
    def observe_request(self, adapter: str | None, version: Any = None, outcome: str = "ok",
                        prompt_tokens: int = 0, generation_tokens: int = 0, ttft: float | None = None,
                        inter_token: Iterable[float] = (), e2e: float | None = None) -> None:
        """Record one finished request.

        ``ttft`` and ``inter_token`` (seconds between consecutive tokens) are recorded whatever the
        outcome (they are real measurements of the tokens that were produced); ``e2e`` only for
        outcome ``ok``, so that the latency of an arm is not skewed by fast failures or disconnects.
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r} (expected one of {', '.join(OUTCOMES)})")
        a, v = self.labels(adapter, version)
        self.requests.labels(a, v, outcome).inc()
        if prompt_tokens:
            self.prompt_tokens.labels(a, v).inc(prompt_tokens)
        if generation_tokens:
            self.generation_tokens.labels(a, v).inc(generation_tokens)
        if ttft is not None:
            self.ttft.labels(a).observe(max(0.0, ttft))
        itl = None
        for gap in inter_token:
            itl = itl or self.inter_token.labels(a)
            itl.observe(max(0.0, gap))
        if e2e is not None and outcome == "ok":
            self.e2e.labels(a, v).observe(max(0.0, e2e))

    def start_request(self, adapter: str | None, version: Any = None, prompt_tokens: int = 0,
                      clock=time.perf_counter) -> RequestTimer:
        """A timer started now; call ``.tokens(n)`` as output arrives and ``.finish(outcome)`` once."""
        return RequestTimer(self, adapter, version, prompt_tokens, clock)

    # ---- engine and adapter cache -------------------------------------------------------------------------
    def set_engine(self, stats: Mapping[str, Any] | Any) -> None:
        """Set the gauges from the engine's stats: a mapping or an object such as ``EngineStats``.

        Reads ``queue_depth`` or ``waiting``, ``running_requests`` or ``running``, ``batch_tokens``
        or ``last_batch_tokens``, ``kv_slots_used``, ``kv_slots_total``; absent ones are left as is.
        """
        get = stats.get if isinstance(stats, Mapping) else (lambda k: getattr(stats, k, None))
        if get("restarts") is not None:
            with self._lock:
                self._advance("restarts", self.engine_restarts, get("restarts"))
        if get("preemptions") is not None:
            with self._lock:
                self._advance("preemptions", self.preemptions, get("preemptions"))
        for name, (queried, hit) in (get("prefix_by_adapter") or {}).items():
            label = self._engine_label(name)
            with self._lock:
                self._advance(f"prefix_q:{name}", self.prefix_queried.labels(label), queried)
                self._advance(f"prefix_h:{name}", self.prefix_hits.labels(label), hit)
        for gauge, keys in _ENGINE_GAUGES.items():
            for key in keys:
                value = get(key)
                if value is not None:
                    getattr(self, gauge).set(value)
                    break

    def _engine_label(self, name: str) -> str:
        """The bounded ``adapter`` label of an engine adapter name: ``NAME`` of ``NAME@VERSION``, ``base``;
        a mixture, a merge or an admin-loaded folder is ``other``."""
        if name == BASE:
            return BASE
        if "@" not in name or "/" in name:
            return OTHER
        return self.labels(name.split("@", 1)[0])[0]

    def set_registry_stale(self, total: int) -> None:
        """Advance the stale-while-error counter to the resolver's cumulative total."""
        with self._lock:
            self._advance("registry_stale", self.registry_stale, total)

    def set_adapter_cache(self, hits: int, misses: int, loads: int, evictions: int,
                          load_seconds_new: Iterable[float] = ()) -> None:
        """Advance the adapter cache counters to the engine's cumulative totals.

        Totals are cumulative (as the adapter manager counts them): the counters move by the
        difference from the last call, never backwards; a total lower than the last one seen is taken
        as a restart from zero. ``load_seconds_new`` are the durations of loads not reported before.
        """
        with self._lock:
            self._advance("hits", self.adapter_cache_hits, hits)
            self._advance("misses", self.adapter_cache_misses, misses)
            self._advance("loads", self.adapter_loads, loads)
            self._advance("evictions", self.adapter_evictions, evictions)
            for seconds in load_seconds_new:
                self.adapter_load_seconds.observe(max(0.0, seconds))

    def update_adapter_cache(self, stats: Any) -> None:
        """:meth:`set_adapter_cache` from an ``AdapterStats``-like object whose ``load_seconds`` lists load
        durations: every one so far, or the latest ones when ``load_seconds_count`` (how many there were in
        all) is given. Only the entries not seen before are observed (at most those still listed)."""
        durations = list(getattr(stats, "load_seconds", ()) or ())
        total = getattr(stats, "load_seconds_count", None)
        total = len(durations) if total is None else int(total)
        with self._lock:
            seen = self._load_seconds_seen if self._load_seconds_seen <= total else 0
            self._load_seconds_seen = total
        new = min(total - seen, len(durations))
        self.set_adapter_cache(stats.hits, stats.misses, stats.loads, stats.evictions,
                               durations[len(durations) - new:] if new > 0 else [])

    def _advance(self, name: str, counter: Counter, total: float) -> None:
        last = self._totals.get(name, 0)
        delta = total if total < last else total - last
        if delta > 0:
            counter.inc(delta)
        self._totals[name] = total

    # ---- exposition ---------------------------------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        """The body and content type for ``GET /metrics``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """Measures one request: TTFT at the first ``tokens()``, inter-token gaps after, e2e at ``finish()``.

    Usable as a context manager: leaving the block without ``finish()`` records ``ok``, or ``error``
    on an exception, or ``aborted`` on cancellation (client disconnect). ``finish`` counts once.
    """

    def __init__(self, metrics: Metrics, adapter: str | None, version: Any, prompt_tokens: int = 0,
                 clock=time.perf_counter) -> None:
        self.metrics = metrics
        self.adapter = adapter
        self.version = version
        self.prompt_tokens = prompt_tokens
        self.generation_tokens = 0
        self.ttft: float | None = None
        self.inter_token: list[float] = []
        self.finished = False
        self._clock = clock
        self._start = clock()
        self._last: float | None = None

    def tokens(self, n: int = 1) -> None:
        """``n`` new tokens arrived now (one streamed chunk); a chunk's gap is shared by its tokens."""
        if n <= 0:
            return
        now = self._clock()
        if self._last is None:
            self.ttft = now - self._start
        else:
            gap = (now - self._last) / n
            self.inter_token.extend([gap] * n)
        self._last = now
        self.generation_tokens += n

    def finish(self, outcome: str = "ok", generation_tokens: int | None = None, prompt_tokens: int | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        self.metrics.observe_request(
            self.adapter, self.version, outcome,
            self.prompt_tokens if prompt_tokens is None else prompt_tokens,
            self.generation_tokens if generation_tokens is None else generation_tokens,
            self.ttft, self.inter_token, self._clock() - self._start,
        )

    def __enter__(self) -> RequestTimer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish("ok")
        elif issubclass(exc_type, (GeneratorExit, asyncio.CancelledError)):
            self.finish("aborted")
        else:
            self.finish("error")


# Reading an exposition back (loraplex route show) lives in adapters.armstats.
from loraplex.adapters.armstats import per_arm, quantile  # noqa: E402,F401  (re-exported)
