"""Which adapters sit in the device slots, which wait in host memory, and loading them off the loop.

Tiers: device slots (``LoraBank``, ``max_loras``) <- host LRU (``max_cpu_loras``) <- the loader
(registry + local cache, or a folder) run on a background thread. The engine asks ``slot_for``
at schedule time; a miss starts a background load and the request waits while others keep
decoding; the finished load is copied into a free slot at the next step boundary (``poll``).

Races this prevents: evicting an adapter that a running request still uses (every admitted request
holds a reference, and only unreferenced slots are evicted); loading one adapter twice when many
requests for it arrive together (one future per name); a failed load retried forever (the error is
kept and handed to the waiting requests, then dropped so a later request can try again).

Deadlock this prevents: a request's adapters are placed all or nothing (``reserve``), and references
are taken only when it is admitted, never while it waits. When waiting requests held references and
placed their adapters one by one, two mixtures of 5 distinct adapters on 8 slots could each place a
part of their set and pin it: neither could ever complete, and nothing else could load. Now a set
that does not fit whole takes no slot at all, and what a waiting request placed stays evictable.
"""

from __future__ import annotations

import enum
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from .bank import LoraBank
from .weights import LoraWeights

Loader = Callable[[str], LoraWeights]


@dataclass(slots=True)
class AdapterStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    load_seconds: list[float] = field(default_factory=list)


class Wait(enum.Enum):
    """Why ``reserve`` gave no slots yet."""

    LOADING = "loading"  # an adapter of the set is not in host memory yet: its load runs on the loader thread
    NO_ROOM = "no room"  # all are loaded, but free and evictable slots are fewer than the set still needs


def _lower_priority() -> None:
    """Loads never take a core from the step loop: the loader thread runs at nice 19 (Linux sets
    niceness per thread), so it gets what the loop leaves idle, including the share the loop hands
    it on purpose (``AdapterManager.yield_to_loads``). Why not a milder nice: the loop's OpenMP
    threads meet at a barrier after every op, so a loader that preempts one of them for a time slice
    stalls both (at nice +5 a cold 19 MB adapter raised the other streams' inter-token p50 by a median
    60% while it loaded; at nice 19 with the yield, 22-25%, 2026-11-23)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


class AdapterManager:
    def __init__(self, bank: LoraBank, loader: Loader, max_cpu_loras: int = 16) -> None:
        self.bank = bank
        self.loader = loader
        # at least a slot's worth: a set is placed once all of it is loaded, so all of it must fit in the host tier
        self.max_cpu_loras = max(max_cpu_loras, bank.max_loras)
        self.stats = AdapterStats()
        self._slots: OrderedDict[str, int] = OrderedDict()  # name -> bank slot, least recently used first
        self._cpu: OrderedDict[str, LoraWeights] = OrderedDict()  # host tier, LRU
        self._refs: dict[str, int] = {}
        self._pins: set[str] = set()  # kept resident by the operator (each holds one reference)
        self._pending: dict[str, Future] = {}
        self._failed: dict[str, Exception] = {}
        self._derived: dict[str, Loader] = {}
        self._images: dict = {}  # name -> SlotImage of a fresh load, until it is placed
        self._digests: dict[str, bytes] = {}  # name -> content digest of its weights in the host tier
        self._slot_digests: dict[int, bytes] = {}  # bank slot -> content digest of what it holds
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lora-loader", initializer=_lower_priority)
        self.load_times: dict[str, float] = {}

    # ---- references (held by every admitted request) -------------------------------------------
    def acquire(self, name: str) -> None:
        self._refs[name] = self._refs.get(name, 0) + 1

    def release(self, name: str) -> None:
        n = self._refs.get(name, 0) - 1
        if n <= 0:
            self._refs.pop(name, None)
        else:
            self._refs[name] = n

    def refs(self, name: str) -> int:
        return self._refs.get(name, 0)

    def register_derived(self, name: str, loader: Loader) -> None:
        """A name whose weights are computed (e.g. a merge) instead of loaded."""
        self._derived.setdefault(name, loader)

    def pin(self, name: str) -> None:
        """Keep name in a device slot until ``unpin`` (placed as soon as it is loaded)."""
        if name in self._pins:
            return
        if len(self._pins) >= self.bank.max_loras:
            raise ValueError(f"all {self.bank.max_loras} adapter slots are pinned already")
        self._pins.add(name)
        self.acquire(name)
        try:
            self.prefetch([name])
        except Exception:  # noqa: BLE001  an earlier load failed: try again
            self.prefetch([name])
        self._place_pins()

    def unpin(self, name: str) -> None:
        if name in self._pins:
            self._pins.discard(name)
            self.release(name)

    @property
    def pinned(self) -> frozenset[str]:
        return frozenset(self._pins)

    # ---- lookups from the step loop ------------------------------------------------------------------
    def check_fits(self, names: Collection[str]) -> None:
        """Raise ValueError if these adapters can never be in device slots together: more distinct ones than
        slots, or than the slots the pinned adapters leave."""
        distinct = set(names)
        pinned = len(self._pins - distinct)
        if len(distinct) > self.bank.max_loras:
            raise ValueError(f"the request needs {len(distinct)} distinct adapters at once but the engine has "
                             f"{self.bank.max_loras} adapter slots (max_loras)")
        if len(distinct) + pinned > self.bank.max_loras:
            raise ValueError(f"the request needs {len(distinct)} adapter slots at once but only "
                             f"{self.bank.max_loras - pinned} of {self.bank.max_loras} are not pinned")

    def reserve(self, names: Sequence[str], protect: Collection[str] = ()) -> list[int] | Wait:
        """The bank slots of all of ``names`` (in order), placing the missing ones, or why not yet.

        All or nothing: the missing adapters are placed only if every one of them fits at once (in free
        slots, or by evicting unreferenced adapters, least recently used first, never one of ``names`` or
        ``protect``); otherwise no slot changes. Loads start for every adapter of the set not in host
        memory. Takes no reference: the caller ``acquire``s when it admits the request, before anything
        else is placed. Raises a failed load's error, and ``check_fits``'s ValueError."""
        distinct = list(dict.fromkeys(names))
        if not distinct:
            return []
        self.check_fits(distinct)
        if not self.prefetch(distinct):
            return Wait.LOADING
        missing = [n for n in distinct if n not in self._slots]
        if missing:
            used = set(self._slots.values())
            free = [s for s in range(self.bank.max_loras) if s not in used]
            keep = set(distinct) | set(protect)
            evictable = [n for n in self._slots if self.refs(n) == 0 and n not in keep]  # LRU first
            if len(missing) > len(free) + len(evictable):
                return Wait.NO_ROOM
            for name in missing:
                if free:
                    slot = free.pop(0)
                else:
                    slot = self._slots.pop(evictable.pop(0))
                    self.stats.evictions += 1
                self.bank.set_lora(slot, self._images.pop(name, None) or self._cpu[name])
                self._slots[name] = slot
                self._slot_digests[slot] = self._digests[name]
        for name in distinct:
            self._slots.move_to_end(name)
            self.stats.hits += 1
        return [self._slots[n] for n in names]

    def prefetch(self, names: Collection[str]) -> bool:
        """Start loads for those of names that are neither in a slot nor in host memory; whether all are (so
        placing them needs no load). Raises (and forgets) a failed load's error."""
        ready = True
        for name in names:
            if name in self._failed:
                raise self._failed.pop(name)
            if name in self._slots or name in self._cpu:
                continue
            ready = False
            if name not in self._pending:
                self.stats.misses += 1
                self._pending[name] = self._pool.submit(self._load, name)
        return ready

    def slots_of(self, names: Sequence[str]) -> list[int]:
        """Slots of adapters that must be resident (a running request's: it holds references on them)."""
        out = []
        for name in names:
            slot = self._slots.get(name)
            if slot is None:
                raise RuntimeError(f"adapter {name} is not in a device slot, but a running request uses it")
            self._slots.move_to_end(name)
            out.append(slot)
        return out

    def slot_digest(self, slot: int) -> bytes:
        """The content digest of the adapter in a bank slot (what its requests' KV blocks are cached under)."""
        return self._slot_digests[slot]

    def slot_for(self, name: str) -> int | None:
        """The bank slot holding name (placed now if it is loaded and fits), or None while it loads or has no
        room. Raises the load's error if it failed."""
        got = self.reserve([name])
        return got[0] if isinstance(got, list) else None

    def _place_pins(self) -> None:
        """Place the pinned adapters that are loaded (a failed pin load waits, with its error, for a request)."""
        for name in sorted(self._pins):
            if name not in self._slots and name in self._cpu:
                self.reserve([name])

    def _load(self, name: str):
        t = time.perf_counter()
        weights = (self._derived.get(name) or self.loader)(name)
        self.bank.check(weights)
        weights = weights.to(None, self.bank.dtype)  # the host tier stays in host memory
        image = self.bank.prepare(weights)  # the slot layout, built here rather than on the step loop
        digest = weights.digest()  # hashed here too: the step loop only looks it up
        self.load_times[name] = time.perf_counter() - t
        return weights, image, digest

    def poll(self) -> None:
        """At a step boundary: move finished loads into the host tier and record failures."""
        for name, fut in list(self._pending.items()):
            if not fut.done():
                continue
            del self._pending[name]
            try:
                weights, image, digest = fut.result()
            except Exception as exc:  # handed to the requests waiting for this adapter
                self._failed[name] = exc
                continue
            self._images[name] = image  # used once, by the first placement
            self._digests[name] = digest
            self.stats.loads += 1
            self.stats.load_seconds.append(self.load_times.get(name, 0.0))
            self._cpu[name] = weights
            self._cpu.move_to_end(name)
            while len(self._cpu) > self.max_cpu_loras:
                gone, _ = self._cpu.popitem(last=False)
                self._images.pop(gone, None)
                self._digests.pop(gone, None)
        if self._pins:
            self._place_pins()

    def resident(self) -> dict[str, dict]:
        out = {n: {"tier": "device", "slot": s, "refs": self.refs(n)} for n, s in self._slots.items()}
        for n in self._cpu:
            out.setdefault(n, {"tier": "host", "slot": None, "refs": self.refs(n)})
        for n in self._pending:
            out.setdefault(n, {"tier": "loading", "slot": None, "refs": self.refs(n)})
        for n, info in out.items():
            info["load_seconds"] = self.load_times.get(n)
        return out

    def loading(self) -> bool:
        """Whether a load is still running (a finished one waits for ``poll`` but needs no CPU)."""
        return any(not f.done() for f in self._pending.values())

    def yield_to_loads(self, seconds: float) -> None:
        """Block the step loop up to ``seconds`` (less if a load finishes), cores and GIL free, so a
        loader at nice 19 gets a bounded share of the machine even when the loop never idles."""
        running = [f for f in self._pending.values() if not f.done()]
        if running and seconds > 0:
            wait(running, timeout=seconds, return_when=FIRST_COMPLETED)

    def wait_idle(self, timeout: float | None = None) -> None:
        """Block until every pending load finished (tests and warm-up)."""
        for fut in list(self._pending.values()):
            fut.exception(timeout)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
