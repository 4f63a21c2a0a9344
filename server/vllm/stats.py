"""What vLLM tells about its engine, collected through its stat-logger plug point.

vLLM reports, after each engine step, the scheduler's running and waiting requests, the KV cache's
usage (a fraction of its blocks), the running adapters by name, and the step's prompt and generated
tokens; when the last request leaves (finished or aborted) it records zeros once more. That is what
``VllmStats`` holds (the native engine's counterpart is ``loraplex.server.engine.async_engine.EngineStats``);
loraplex's adapter-cache counters (hits, misses, loads, evictions) have no vLLM counterpart and stay unknown
(None), never guessed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class VllmStats:
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use
    batch_tokens: int = 0  # tokens (prompt + generated) of the last recorded step
    steps: int = 0  # engine steps recorded
    running_adapters: dict[str, int] = field(default_factory=dict)  # lora_name -> running requests
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, scheduler_stats, iteration_stats) -> None:
        with self.lock:
            if scheduler_stats is not None:
                self.running = scheduler_stats.num_running_reqs
                self.waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
                self.kv_cache_usage = float(scheduler_stats.kv_cache_usage)
                self.running_adapters = dict(scheduler_stats.running_lora_adapters)
            if iteration_stats is not None:
                self.steps += 1
                self.batch_tokens = iteration_stats.num_generation_tokens + iteration_stats.num_prompt_tokens


def stat_logger(sink: VllmStats):
    """A vLLM stat-logger factory (``AsyncLLM(stat_loggers=[...])``) that records into ``sink``."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class LoraplexStatLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0, **_) -> None:
            sink.record(scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    return LoraplexStatLogger
