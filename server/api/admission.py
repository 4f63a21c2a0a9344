"""Admission: a bounded queue in front of the engine.

At most ``kv_slots_total`` requests run in the engine at once; up to ``max_queue`` more may wait. A
request beyond that is refused at once with a 429 (``OverloadedError``, ``Retry-After: 1``) and
counted as ``rejected`` in the metrics. An admitted request holds a :class:`Ticket` for the number of
generations it starts (a completion request with a list of prompts starts one per prompt) and gives
it back exactly once when it ends, however it ends.

A key with ``max_concurrent`` (see ``auth``) may hold at most that many places at once: past it, a 429
names the key's limit (the server may have room: only that key waits), so one key cannot fill every
KV slot and the queue.

All of it runs on the event loop's one thread: the counter needs no lock.
"""

from __future__ import annotations

from .auth import Principal
from .backend import EngineBackend
from .errors import OverloadedError
from .metrics import OTHER, Metrics


class Ticket:
    """An admitted request's hold on ``n`` places; :meth:`release` gives them back once."""

    __slots__ = ("_admission", "key", "n")

    def __init__(self, admission: Admission, n: int, key: str | None = None) -> None:
        self._admission = admission
        self.n = n  # places still held (0 once released)
        self.key = key  # the key's name when its places are counted against its own limit

    def release(self) -> None:
        """Give the places back; a second call does nothing."""
        if self.n:
            self._admission._give_back(self.n, self.key)
            self.n = 0


class Admission:
    """The counter of admitted, unfinished generations against the engine's capacity plus the queue."""

    def __init__(self, backend: EngineBackend, max_queue: int, metrics: Metrics | None = None) -> None:
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        self.backend = backend
        self.max_queue = max_queue  # waiting requests allowed beyond what the engine runs at once
        self.metrics = metrics  # where refusals are counted, if anywhere
        self._outstanding = 0  # places held by admitted requests not yet finished
        self._per_key: dict[str, int] = {}  # places held per key name, for keys with max_concurrent

    @property
    def outstanding(self) -> int:
        return self._outstanding

    def held_by(self, key: str) -> int:
        """Places the key named ``key`` holds now (counted only for keys with ``max_concurrent``)."""
        return self._per_key.get(key, 0)

    @property
    def capacity(self) -> int:
        """The engine's concurrent requests (its KV slots, read now) plus the queue."""
        return self.backend.stats()["kv_slots_total"] + self.max_queue

    def check_key(self, who: Principal, n: int = 1) -> None:
        """Refuse (429) a key already at its ``max_concurrent`` before anything is done for its request (the
        registry is not asked, no template rendered); :meth:`admit` checks again when it takes the places. The
        refusal is counted under the ``other`` adapter label: the request's adapter is not resolved yet."""
        limit = who.max_concurrent
        if limit is not None and self._per_key.get(who.name, 0) + n > limit:
            self._reject(OTHER, "")
            raise OverloadedError(f"API key {who.name!r} has {self._per_key.get(who.name, 0)} of its {limit} "
                                  "concurrent generations in flight; retry later", 1)

    def admit(self, n: int = 1, *, adapter: str = "base", version: str = "", who: Principal | None = None) -> Ticket:
        """Hold ``n`` places, or raise ``OverloadedError`` (429) when they do not fit the server, or the
        key ``who`` past its ``max_concurrent``; ``adapter`` and ``version`` label the refusal in the metrics."""
        limit = who.max_concurrent if who is not None else None
        key = who.name if limit is not None else None
        if key is not None and self._per_key.get(key, 0) + n > limit:
            self._reject(adapter, version)
            raise OverloadedError(f"API key {key!r} has {self._per_key.get(key, 0)} of its {limit} concurrent "
                                  f"generations in flight; retry later", 1)
        if self._outstanding + n > self.capacity:
            self._reject(adapter, version)
            raise OverloadedError(f"the server is at capacity ({self._outstanding} requests in flight); retry later", 1)
        self._outstanding += n
        if key is not None:
            self._per_key[key] = self._per_key.get(key, 0) + n
        return Ticket(self, n, key)

    def _reject(self, adapter: str, version: str) -> None:
        if self.metrics is not None:
            self.metrics.observe_request(adapter, version, "rejected")

    def _give_back(self, n: int, key: str | None) -> None:
        self._outstanding -= n
        if key is not None:
            left = self._per_key.get(key, 0) - n
            if left > 0:
                self._per_key[key] = left
            else:
                self._per_key.pop(key, None)
