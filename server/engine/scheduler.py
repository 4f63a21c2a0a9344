"""Continuous batching: which sequences run in the next step, and with how many tokens.

Every step: each running sequence past its prompt decodes one token; sequences still in their
prompt get a chunk (at most ``prefill_chunk`` tokens) of what is left of ``max_batched_tokens``;
then waiting requests are admitted in arrival order while the KV pool has blocks for their first chunk,
fewer than ``max_running`` run, token budget remains and their adapters are in device slots.

KV blocks are taken as a sequence grows; an admitted sequence first takes back the cached blocks its tokens
start with (prefix caching, ``block_pool``) and computes only the rest. When the pool runs out mid-flight, the most recently admitted
running sequence gives its blocks back and returns to the head of the queue (preemption by recompute:
readmitted, it computes its prompt and outputs so far again and goes on; greedy outputs do not change). The
engine refuses at admission a request that could not fit even alone, so preemption always ends. A request
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
from .block_pool import BlockPool, block_hash, identity
from .sequence import Sequence, Status


SCORED_CHUNK = 256  # prompt tokens a step computes for requests that asked for prompt logprobs, all together
MAX_PREFIX_KEYS = 64  # adapters counted apart in the prefix cache statistics


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
    def __init__(self, config: SchedulerConfig, pool: BlockPool, adapters: AdapterManager) -> None:
        self.config = config
        self.pool = pool
        self.adapters = adapters
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.failed: list[tuple[Sequence, Exception]] = []  # adapter loads that failed, for the engine to report
        self.preemptions = 0  # running sequences sent back to the queue because the KV pool ran out
        # prefix cache, cumulative: engine adapter name ("base", "mixture", "other" past MAX_PREFIX_KEYS names)
        # -> [prompt tokens looked up, tokens found cached]
        self.prefix_by_adapter: dict[str, list[int]] = {}

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; it takes adapter references only when admitted."""
        self.waiting.append(seq)

    def admit(self, seq: Sequence) -> None:
        """Waiting -> running: references on its adapters (whose slots it has just reserved). Its KV blocks are
        taken as it grows (``_grow``)."""
        for name, _ in seq.adapters:
            self.adapters.acquire(name)
        seq.status = Status.RUNNING
        self.waiting.remove(seq)
        self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted): free its blocks and adapter references at once."""
        admitted = seq.status is Status.RUNNING  # only an admitted sequence holds references
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free_blocks(seq)
        if admitted:
            for name, _ in seq.adapters:
                self.adapters.release(name)
        seq.status = Status.FINISHED

    def _free_blocks(self, seq: Sequence) -> None:
        if seq.blocks:
            self.pool.free(seq.blocks)
        seq.blocks, seq.block_hashes = [], []

    def _grow(self, seq: Sequence, tokens: int) -> bool:
        """Give ``seq`` the blocks to hold ``tokens`` tokens; False (nothing taken) when too few are free."""
        need = self.pool.blocks_for(tokens) - len(seq.blocks)
        if need <= 0:
            return True
        got = self.pool.allocate(need)
        if got is None:
            return False
        seq.blocks.extend(got)
        return True

    def _chunk(self, seq: Sequence, scored_left: int) -> int:
        """The most prompt tokens ``seq`` computes in this step. A request scoring its prompt gets logits for each
        (a [tokens, vocab] float32 block: 50 MB for 256 tokens of a 49k vocabulary), so the scoring requests of a
        step share at most SCORED_CHUNK tokens (``scored_left`` of them are still free)."""
        return self.config.prefill_chunk if seq.params.prompt_logprobs is None else \
            min(self.config.prefill_chunk, scored_left)

    def _reuse(self, seq: Sequence, slots: list[int]) -> None:
        """A sequence about to be admitted: its identity, and the cached blocks its tokens start with (it then
        computes only what follows them). At least its last token is left to compute: it gives the logits."""
        seq.identity = identity([(self.adapters.slot_digest(s), w) for s, (_, w) in zip(slots, seq.adapters)],
                                seq.params.cache_salt)
        looked = seq.prefill_len - 1 if seq.params.prompt_logprobs is None else 0  # (scoring computes every token)
        seq.blocks, seq.block_hashes = self.pool.match(seq.identity, seq.all_ids[:looked])
        seq.num_cached = len(seq.blocks) * self.pool.block_size
        if not seq.preemptions:
            seq.cached_prompt = seq.num_cached
        key = seq.adapters[0][0] if len(seq.adapters) == 1 else "mixture" if seq.adapters else "base"
        if key not in self.prefix_by_adapter and len(self.prefix_by_adapter) >= MAX_PREFIX_KEYS:
            key = "other"
        counts = self.prefix_by_adapter.setdefault(key, [0, 0])
        counts[0] += looked
        counts[1] += seq.num_cached

    def commit(self, seq: Sequence) -> None:
        """After a step: register the blocks of ``seq`` that its cached tokens have just filled."""
        size, ids = self.pool.block_size, None
        while len(seq.block_hashes) < seq.num_cached // size:
            i = len(seq.block_hashes)
            ids = ids or seq.all_ids
            h = block_hash(seq.block_hashes[-1] if i else b"", seq.identity, ids[i * size:(i + 1) * size])
            self.pool.register(seq.blocks[i], h)
            seq.block_hashes.append(h)

    def _preempt(self, seq: Sequence) -> None:
        """Running -> the head of the queue: its blocks and adapter references go back; it computes its tokens
        again when readmitted (recompute, as vLLM V1 does), and goes on from the same outputs."""
        self.running.remove(seq)
        self._free_blocks(seq)
        seq.num_cached = 0
        for name, _ in seq.adapters:
            self.adapters.release(name)
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _room(self, seq: Sequence, tokens: int, plan: list[Scheduled]) -> bool:
        """Blocks for a running ``seq`` to reach ``tokens`` tokens, preempting the most recently admitted running
        sequences (dropping their share of ``plan``) until they fit; False if ``seq`` itself had to go."""
        while not self._grow(seq, tokens):
            victim = self.running[-1]
            plan[:] = [p for p in plan if p.seq is not victim]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _lora(self, seq: Sequence) -> list[tuple[int, float]]:
        """Bank slots of a running sequence's adapters (resident: it holds references on them)."""
        slots = self.adapters.slots_of([name for name, _ in seq.adapters])
        return [(slot, weight) for slot, (_, weight) in zip(slots, seq.adapters)]

    def schedule(self) -> list[Scheduled]:
        self.adapters.poll()
        budget = self.config.max_batched_tokens
        plan: list[Scheduled] = []
        preemptions_before = self.preemptions
        for seq in list(self.running):  # decodes first (oldest first): they are one token each
            if seq.status is Status.RUNNING and not seq.prefilling and budget > 0:
                if self._room(seq, seq.num_cached + 1, plan):
                    plan.append(Scheduled(seq, 1, self._lora(seq)))
                    budget -= 1
        budget = self.config.max_batched_tokens - sum(p.num_tokens for p in plan)
        scored_left = SCORED_CHUNK
        for seq in list(self.running):
            if seq.status is Status.RUNNING and seq.prefilling and budget > 0:
                n = min(seq.prefill_len - seq.num_cached, self._chunk(seq, scored_left), budget)
                if n > 0 and self._room(seq, seq.num_cached + n, plan):
                    plan.append(Scheduled(seq, n, self._lora(seq)))
                    budget = self.config.max_batched_tokens - sum(p.num_tokens for p in plan)
                    scored_left -= n if seq.params.prompt_logprobs is not None else 0
        first_blocked: set[str] | None = None  # the adapter set of the oldest request with no room for it
        preempted = self.preemptions != preemptions_before
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.config.max_running or preempted:
                break  # (after a preemption the pool is short: nobody new this step)
            if self._chunk(seq, scored_left) == 0:
                break  # this step's scoring share is taken (in arrival order: nobody overtakes it)
            if self.pool.blocks_for(min(seq.prefill_len, self._chunk(seq, scored_left), budget)) > self.pool.free_blocks:
                break  # in arrival order: nobody overtakes a request waiting for blocks (checked again below)
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
            self._reuse(seq, slots)
            n = min(seq.prefill_len - seq.num_cached, self._chunk(seq, scored_left), budget)
            if not self._grow(seq, seq.num_cached + n):  # (reused blocks it held were free ones)
                self._free_blocks(seq)
                seq.num_cached = 0
                break
            self.admit(seq)
            plan.append(Scheduled(seq, n, [(slot, w) for slot, (_, w) in zip(slots, seq.adapters)]))
            budget -= n
            scored_left -= n if seq.params.prompt_logprobs is not None else 0
        return plan

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)
