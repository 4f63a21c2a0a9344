"""Continuous batching: which sequences run in the next step, and with how many tokens.

Every step: each running sequence past its prompt decodes one token; sequences still in their
prompt get a chunk (at most ``prefill_chunk`` tokens) of what is left of ``max_batched_tokens``;
then waiting requests are admitted in arrival order while a KV slot is free, fewer than
``max_running`` run, token budget remains and their adapters are in device slots. A request
whose adapter is still loading is skipped, not blocking the ones behind it (no head-of-line
blocking on a cold adapter).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..lora.manager import AdapterManager
from ..model.kv_cache import KVCache
from .sequence import Sequence, Status


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_running: int = 32
    max_batched_tokens: int = 512
    prefill_chunk: int = 256


@dataclass(frozen=True, slots=True)
class Scheduled:
    seq: Sequence
    num_tokens: int
    lora: list[tuple[int, float]]  # (bank slot, weight)


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: KVCache, adapters: AdapterManager) -> None:
        self.config = config
        self.cache = cache
        self.adapters = adapters
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.failed: list[tuple[Sequence, Exception]] = []  # adapter loads that failed, for the engine to report

    def add(self, seq: Sequence) -> None:
        for name, _ in seq.adapters:
            self.adapters.acquire(name)
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted): free its slot and adapter references at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.slot is not None:
            self.cache.release(seq.slot)
            seq.slot = None
        for name, _ in seq.adapters:
            self.adapters.release(name)
        seq.status = Status.FINISHED

    def _lora(self, seq: Sequence) -> list[tuple[int, float]] | None:
        """Bank slots of the sequence's adapters, or None if one is not resident yet."""
        out = []
        for name, weight in seq.adapters:
            slot = self.adapters.slot_for(name)
            if slot is None:
                return None
            out.append((slot, weight))
        return out

    def schedule(self) -> list[Scheduled]:
        self.adapters.poll()
        budget = self.config.max_batched_tokens
        plan: list[Scheduled] = []
        for seq in self.running:  # decodes first: they are one token each
            if not seq.prefilling and budget > 0:
                plan.append(Scheduled(seq, 1, self._lora(seq) or []))
                budget -= 1
        for seq in self.running:
            if seq.prefilling and budget > 0:
                n = min(len(seq.prompt_ids) - seq.num_cached, self.config.prefill_chunk, budget)
                plan.append(Scheduled(seq, n, self._lora(seq) or []))
                budget -= n
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.config.max_running or self.cache.free_slots == 0:
                break
            try:
                lora = self._lora(seq)
            except Exception as exc:  # its adapter failed to load
                self.failed.append((seq, exc))
                self.finish(seq)
                continue
            if lora is None:
                continue
            seq.slot = self.cache.allocate()
            seq.status = Status.RUNNING
            self.waiting.remove(seq)
            self.running.append(seq)
            n = min(len(seq.prompt_ids), self.config.prefill_chunk, budget)
            plan.append(Scheduled(seq, n, lora))
            budget -= n
        return plan

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)
