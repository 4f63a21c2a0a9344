"""Continuous batching: which sequences run in the next step, and with how many tokens.

Every step: each running sequence past its prompt decodes one token; sequences still in their
prompt get a chunk (at most ``prefill_chunk`` tokens) of what is left of ``max_batched_tokens``;
then waiting requests are admitted in arrival order while a KV slot is free, fewer than
``max_running`` run, token budget remains and their adapters are in device slots. A request
whose adapter is still loading is skipped, not blocking the ones behind it (no head-of-line
blocking on a cold adapter).

Adapter slots are handed out like KV slots, in arrival order and all or nothing. A request's
adapters (one, or a mixture's set) are placed together or not at all (``AdapterManager.reserve``),
and it takes its references only when admitted, so a waiting request never pins a slot. When the
oldest request whose adapters are loaded finds no room for its set, the requests behind it may use
only adapters of that set (or none) until it is admitted: they neither place other adapters nor
take references that would keep the slots it waits for busy. Running requests finish, their slots
become evictable, and it gets its set; without this rule a steady stream of other adapters could
starve a large mixture for ever. Their loads still start, so they are warm when their turn comes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..lora.manager import AdapterManager, Wait
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
        """Queue a sequence; it takes adapter references only when admitted."""
        self.waiting.append(seq)

    def admit(self, seq: Sequence) -> None:
        """Waiting -> running: a KV slot and references on its adapters (whose slots it has just reserved)."""
        seq.slot = self.cache.allocate()
        for name, _ in seq.adapters:
            self.adapters.acquire(name)
        seq.status = Status.RUNNING
        self.waiting.remove(seq)
        self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted): free its slot and adapter references at once."""
        admitted = seq.status is Status.RUNNING  # only an admitted sequence holds references
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.slot is not None:
            self.cache.release(seq.slot)
            seq.slot = None
        if admitted:
            for name, _ in seq.adapters:
                self.adapters.release(name)
        seq.status = Status.FINISHED

    def _lora(self, seq: Sequence) -> list[tuple[int, float]]:
        """Bank slots of a running sequence's adapters (resident: it holds references on them)."""
        slots = self.adapters.slots_of([name for name, _ in seq.adapters])
        return [(slot, weight) for slot, (_, weight) in zip(slots, seq.adapters)]

    def schedule(self) -> list[Scheduled]:
        self.adapters.poll()
        budget = self.config.max_batched_tokens
        plan: list[Scheduled] = []
        for seq in self.running:  # decodes first: they are one token each
            if not seq.prefilling and budget > 0:
                plan.append(Scheduled(seq, 1, self._lora(seq)))
                budget -= 1
        for seq in self.running:
            if seq.prefilling and budget > 0:
                n = min(len(seq.prompt_ids) - seq.num_cached, self.config.prefill_chunk, budget)
                plan.append(Scheduled(seq, n, self._lora(seq)))
                budget -= n
        first_blocked: set[str] | None = None  # the adapter set of the oldest request with no room for it
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.config.max_running or self.cache.free_slots == 0:
                break
            names = [name for name, _ in seq.adapters]
            try:
                if first_blocked is not None and not first_blocked.issuperset(names):
                    self.adapters.prefetch(names)  # its turn comes after the blocked one's
                    continue
                slots = self.adapters.reserve(names, protect=first_blocked or ())
            except Exception as exc:  # an adapter failed to load, or the set can never fit
                self.failed.append((seq, exc))
                self.finish(seq)
                continue
            if slots is Wait.NO_ROOM and first_blocked is None:
                first_blocked = set(names)
            if isinstance(slots, Wait):
                continue
            self.admit(seq)
            n = min(len(seq.prompt_ids), self.config.prefill_chunk, budget)
            plan.append(Scheduled(seq, n, [(slot, w) for slot, (_, w) in zip(slots, seq.adapters)]))
            budget -= n
        return plan

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)
