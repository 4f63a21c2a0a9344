"""Admission: a bounded queue in front of the engine.

At most ``kv_slots_total`` requests run in the engine at once; up to ``max_queue`` more may wait. A
request beyond that is refused at once with a 429 (``OverloadedError``, ``Retry-After: 1``) and
counted as ``rejected`` in the metrics. An admitted request holds a :class:`Ticket` for the number of
generations it starts (a completion request with a list of prompts starts one per prompt) and gives
it back exactly once when it ends, however it ends.

All of it runs on the event loop's one thread: the counter needs no lock.
"""

from __future__ import annotations

from .backend import EngineBackend
from .errors import OverloadedError
from .metrics import Metrics


class Ticket:
    """An admitted request's hold on ``n`` places; :meth:`release` gives them back once."""

    __slots__ = ("_admission", "n")

    def __init__(self, admission: Admission, n: int) -> None:
        self._admission = admission
        self.n = n  # places still held (0 once released)

    def release(self) -> None:
        """Give the places back; a second call does nothing."""
        if self.n:
            self._admission._outstanding -= self.n
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

    @property
    def outstanding(self) -> int:
        return self._outstanding

    @property
    def capacity(self) -> int:
        """The engine's concurrent requests (its KV slots, read now) plus the queue."""
        return self.backend.stats()["kv_slots_total"] + self.max_queue

    def admit(self, n: int = 1, *, adapter: str = "base", version: str = "") -> Ticket:
        """Hold ``n`` places, or raise ``OverloadedError`` (429) when they do not fit; ``adapter`` and
        ``version`` label the refusal in the metrics."""
        if self._outstanding + n > self.capacity:
            if self.metrics is not None:
                self.metrics.observe_request(adapter, version, "rejected")
            raise OverloadedError(f"the server is at capacity ({self._outstanding} requests in flight); retry later", 1)
        self._outstanding += n
        return Ticket(self, n)
