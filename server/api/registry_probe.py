"""Whether the adapter registry lets this replica serve, for ``GET /ready``.

A replica that starts while the registry is unreachable and has nothing cached cannot serve a single
adapter, so it reports not ready (503) and a load balancer keeps traffic away; one that has adapters in its
local cache starts ready and serves them (and the base model) through the outage. The first probe runs in
the background when the server starts; while the registry stays unreachable, ``/ready`` probes again at most
every ``interval`` seconds (in the background: ``/ready`` never waits on the registry). Once the registry
answered, the replica stays ready: later outages are the resolver's stale-while-error, not a reason to drain.
"""

from __future__ import annotations

import logging
import threading
import time

from loraplex.adapters import AdapterRegistry
from loraplex.adapters.errors import NotFoundError, StorageError
from loraplex.adapters.storage import PROBE_PREFIX

log = logging.getLogger("loraplex.api")


class RegistryProbe:
    def __init__(self, registry: AdapterRegistry | None, interval: float = 2.0) -> None:
        self.registry = registry
        self.interval = interval
        self._ok = registry is None  # no registry: nothing to wait for
        self.reason = ""  # why not ready, for the 503's message
        self._last = float("-inf")
        self._running = False
        self._lock = threading.Lock()

    def start(self) -> RegistryProbe:
        self._kick()
        return self

    @property
    def ready(self) -> bool:
        """Whether the registry answered once, or the local cache holds adapters; probes again if due."""
        if not self._ok:
            self._kick()
        return self._ok

    def _kick(self) -> None:
        with self._lock:
            if self._ok or self._running or time.monotonic() - self._last < self.interval:
                return
            self._running, self._last = True, time.monotonic()
        threading.Thread(target=self._probe, name="loraplex-registry-probe", daemon=True).start()

    def _probe(self) -> None:
        try:
            try:  # one cheap call: reading a key that is never written (absent is an answer)
                self.registry.storage.read(PROBE_PREFIX + "ready", limit=1 << 10)
            except NotFoundError:
                pass
            self._ok, self.reason = True, ""
        except StorageError as exc:
            if self.registry.cache is not None and self.registry.cache.holds_adapters():
                log.warning("the adapter registry is unreachable (%s); serving the adapters cached locally", exc)
                self._ok, self.reason = True, ""
            else:
                log.error("the adapter registry is unreachable and nothing is cached locally: not ready (%s)", exc)
                self.reason = "the adapter registry is unreachable and nothing is cached locally"
        except Exception as exc:  # noqa: BLE001  a probe never takes the server down
            log.exception("registry probe failed")
            self.reason = f"the registry probe failed: {type(exc).__name__}"
        finally:
            with self._lock:
                self._running = False
