"""From the ``model`` a request names to the pinned adapters the engine serves.

``base`` or the base id: no adapter. ``NAME``: its A/B route if one exists (sticky per user), else
its latest version. ``NAME@7``, ``NAME@prod``: that version, that alias. ``BASE:NAME...``: the same,
with the base named. Names loaded through the admin API resolve to their folder. Every adapter is
pinned to ``NAME@VERSION`` here, so a request finishes on the version it started with whatever
moves meanwhile. Registry reads (aliases, latest, routes) are cached for ``ttl`` seconds; manifests
of versions are immutable and cached for good; ``refresh()`` drops the cache.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from adapters import AdapterRef, AdapterRegistry, BaseModelInfo
from adapters.errors import InvalidNameError, NotFoundError
from adapters.manifest import Manifest


@dataclass(frozen=True, slots=True)
class Target:
    """One resolved adapter: the engine's name for it, and labels for responses and metrics."""

    engine_name: str  # "NAME@VERSION", or a folder path for an admin-loaded adapter
    display: str  # "NAME@VERSION" or the admin-given name
    name: str
    version: str


class Resolver:
    def __init__(self, registry: AdapterRegistry | None, base_id: str, base_info: BaseModelInfo | None,
                 routes=None, ttl: float = 5.0) -> None:
        self.registry = registry
        self.base_id = base_id
        self.base_info = base_info
        self.routes = routes  # adapters.routes.RouteStore or None
        self.ttl = ttl
        self.local: dict[str, str] = {}  # admin-loaded name -> folder
        self._cache: dict[tuple, tuple[float, object]] = {}
        self._lock = threading.Lock()

    def refresh(self) -> None:
        with self._lock:
            self._cache.clear()

    def _cached(self, key: tuple, load):
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit and now - hit[0] < self.ttl:
                return hit[1]
        value = load()
        with self._lock:
            self._cache[key] = (now, value)
        return value

    def is_base(self, model: str) -> bool:
        return model in ("base", self.base_id)

    def strip_base(self, model: str) -> str:
        prefix, sep, rest = model.partition(":")
        if sep and prefix in ("base", self.base_id):
            return rest
        if sep:
            raise NotFoundError(f"the model `{model}` does not exist: this server serves base model {self.base_id}")
        return model

    def target(self, ref: str, user: str | None = None) -> Target:
        """An adapter reference to one pinned version."""
        ref = self.strip_base(ref)
        if ref in self.local:
            return Target(self.local[ref], ref, ref, "local")
        try:
            r = AdapterRef.parse(ref)
        except InvalidNameError:
            raise NotFoundError(f"the model `{ref}` does not exist") from None
        if self.registry is None:
            raise NotFoundError(f"the model `{ref}` does not exist")
        if r.version is None and r.alias is None and self.routes is not None:
            route = self._cached(("route", r.name), lambda: self.routes.get(r.name))
            if route is not None:
                arm = route.pick(user)
                return self._pinned(self.registry.resolve(arm.ref))
        try:
            manifest = self._cached(("ref", str(r)), lambda: self.registry.resolve(r)) if r.version is None \
                else self.registry.manifest(r.name, r.version)
        except NotFoundError:  # without the registry's location in the message
            raise NotFoundError(f"the model `{ref}` does not exist") from None
        return self._pinned(manifest)

    def _pinned(self, m: Manifest) -> Target:
        if self.base_info is not None:
            self.registry.check_base(m, self.base_info)
        return Target(m.ref, m.ref, m.name, str(m.version))

    def listing(self) -> list[str]:
        """Every servable model id: each adapter, each of its versions and aliases, and local names."""
        def load() -> list[str]:
            ids: list[str] = []
            if self.registry is not None:
                for name in self.registry.names():
                    ids.append(name)
                    ids += [f"{name}@{v}" for v in self.registry.version_numbers(name)]
                    ids += [f"{name}@{a}" for a in sorted(self.registry.aliases(name)) if a != "latest"]
            return ids

        return self._cached(("listing",), load) + sorted(self.local)
