"""From the ``model`` a request names to the pinned adapters the engine serves.

``base`` or the base id: no adapter. ``NAME``: its A/B route if one exists (sticky per user), else
its latest version. ``NAME@7``, ``NAME@prod``: that version, that alias. ``BASE:NAME...``: the same,
with the base named. Names loaded through the admin API resolve to their folder. Every adapter is
pinned to ``NAME@VERSION`` here, so a request finishes on the version it started with whatever
moves meanwhile. Registry reads (aliases, latest, versions, routes) are cached for ``ttl`` seconds (so
a removed version stops resolving within ``ttl``), at most ``MAX_CACHED`` of them; ``refresh()`` drops
the cache.

``resolve`` turns a whole request body (``model``, or an ``adapters`` mixture, or their ``merge``)
into what the engine serves, checked against the caller's key; ``add_local``/``remove_local`` are
the admin API's load and unload.

Tenant isolation: every name is authorized as the client wrote it (``BASE:NAME@TAG`` -> ``NAME``, a
route's name too) before anything looks it up, so a name outside the key's patterns never reaches the
registry, and its 404 is byte for byte the one of a name that does not exist: both are built from the
text the client sent (:func:`missing`), never from what it resolved to, and never name the registry.
A name the registry does not hold is remembered for ``negative_ttl`` seconds, so asking again for an
absent name does not reach the registry either.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.adapters import AdapterRef, AdapterRegistry, BaseModelInfo
from loraplex.adapters.errors import (IncompatibleBaseError, InvalidAdapterError, InvalidNameError, NotFoundError,
                                      StorageError)
from loraplex.adapters.manifest import Manifest
from loraplex.adapters.reference import check_name
from loraplex.adapters.spec import validate_adapter

from .auth import Principal

log = logging.getLogger("loraplex.api")

MAX_CACHED = 4096  # registry lookups remembered at once (found or absent); the oldest go first
NEGATIVE_TTL = 2.0  # seconds an absent name is remembered, at most (never longer than ``ttl``)


def missing(asked: str) -> NotFoundError:
    """The one 404 of a model a key may not see: absent, forbidden, unparsable, or its route arm gone."""
    return NotFoundError(f"the model `{asked}` does not exist")


@dataclass(frozen=True, slots=True)
class Target:
    """One resolved adapter: the engine's name for it, and labels for responses and metrics."""

    engine_name: str  # "NAME@VERSION", or a folder path for an admin-loaded adapter
    display: str  # "NAME@VERSION" or the admin-given name
    name: str
    version: str


@dataclass(slots=True)
class Served:
    """What one request resolved to."""

    adapters: list[tuple[str, float]]  # engine names and weights; [] for the base model
    display: str  # the response's "model"
    label: str  # metrics adapter label: the adapter's name, or base | mix | merge
    version: str  # metrics version label ("" for base, mixtures and merges)
    targets: list[Target] = field(default_factory=list)  # the adapters named, in request order


class Resolver:
    def __init__(self, registry: AdapterRegistry | None, base_id: str, base_info: BaseModelInfo | None,
                 routes=None, ttl: float = 5.0, negative_ttl: float | None = None) -> None:
        self.registry = registry
        self.base_id = base_id
        self.base_info = base_info
        self.routes = routes  # adapters.routes.RouteStore or None
        self.ttl = ttl  # seconds a found alias, latest version, version or route is reused
        self.negative_ttl = min(ttl, NEGATIVE_TTL) if negative_ttl is None else negative_ttl  # ... an absent one
        self.local: dict[str, str] = {}  # admin-loaded name -> folder (through add_local/remove_local)
        self._cache: dict[tuple, tuple[float, object, bool]] = {}  # key -> (when, value, absent)
        self._lock = threading.Lock()
        self.stale_served = 0  # resolutions answered from a stale entry because the registry failed

    def refresh(self) -> None:
        with self._lock:
            self._cache.clear()

    def _cached(self, key: tuple, load):
        """``load()``, reused for ``ttl`` seconds; a ``NotFoundError`` is remembered (and raised again)
        for ``negative_ttl`` seconds. Stale-while-error: when the registry fails (``StorageError``: S3 down,
        timeouts) and a resolution is remembered, however old, it is served again (counted in
        ``stale_served``), so adapters in use keep serving through a registry outage."""
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and now - hit[0] < (self.negative_ttl if hit[2] else self.ttl):
                if hit[2]:
                    raise NotFoundError("absent")
                return hit[1]
        try:
            value = load()
        except NotFoundError:
            self._remember(key, (now, None, True))
            raise
        except StorageError:
            if hit is None or hit[2]:
                raise
            log.warning("registry unavailable; serving the last known resolution of %s", key)
            with self._lock:
                self.stale_served += 1
            return hit[1]
        self._remember(key, (now, value, False))
        return value

    def _remember(self, key: tuple, entry: tuple[float, object, bool]) -> None:
        with self._lock:
            self._cache.pop(key, None)
            self._cache[key] = entry
            while len(self._cache) > MAX_CACHED:  # oldest first (insertion order)
                self._cache.pop(next(iter(self._cache)))

    def is_base(self, model: str) -> bool:
        return model in ("base", self.base_id)

    def strip_base(self, model: str) -> str:
        prefix, sep, rest = model.partition(":")
        if sep and prefix in ("base", self.base_id):
            return rest
        if sep:
            raise NotFoundError(f"the model `{model}` does not exist: this server serves base model {self.base_id}")
        return model

    def authorize(self, asked: str, who: Principal) -> str:
        """The reference ``asked`` names without its base (``BASE:NAME@TAG`` -> ``NAME@TAG``), once ``who``
        may use its name; else :func:`missing` (404), the same as for a name that does not exist. Looks
        nothing up."""
        ref = self.strip_base(asked)
        if not who.may_use(ref):
            raise missing(asked)
        return ref

    def target(self, asked: str, user: str | None, who: Principal) -> Target:
        """The adapter reference a client wrote (``NAME``, ``NAME@7``, ``NAME@prod``, ``BASE:...``, a route,
        an admin-loaded name) to one pinned version, for the key ``who``. Authorized before anything is
        looked up; every refusal names only ``asked``."""
        ref = self.authorize(asked, who)
        try:
            t = self._target(ref, user)
        except NotFoundError:  # absent, an unparsable name, a route arm gone: without the registry's location
            raise missing(asked) from None
        except IncompatibleBaseError:  # the stored base may be a path of the machine that pushed it
            raise IncompatibleBaseError(f"the model `{asked}` was made for a different base model, "
                                        f"not {self.base_id}") from None
        if not who.may_use(t.name):  # a route whose arm is another adapter, outside the key's patterns
            raise missing(asked)
        return t

    def _target(self, ref: str, user: str | None) -> Target:
        if ref in self.local:
            return Target(self.local[ref], ref, ref, "local")
        try:
            r = AdapterRef.parse(ref)
        except InvalidNameError:
            raise NotFoundError(ref) from None
        if self.registry is None:
            raise NotFoundError(ref)
        if r.version is None and r.alias is None and self.routes is not None:
            route = self._cached(("route", r.name), lambda: self.routes.get(r.name))
            if route is not None:
                arm = route.pick(user)
                return self._pinned(self._cached(("ref", arm.ref),
                                                 lambda: self.registry.resolve(arm.ref, max_age=self.ttl)))
        # max_age: a version removed by another process stops resolving within ttl (its manifest is re-read)
        if r.version is None:
            manifest = self._cached(("ref", str(r)), lambda: self.registry.resolve(r, max_age=self.ttl))
        else:
            manifest = self._cached(("ref", str(r)), lambda: self.registry.manifest(r.name, r.version,
                                                                                     max_age=self.ttl))
        return self._pinned(manifest)

    def _pinned(self, m: Manifest) -> Target:
        if self.base_info is not None:
            self.registry.check_base(m, self.base_info)
        return Target(m.ref, m.ref, m.name, str(m.version))

    def resolve(self, req, user: str | None, who: Principal, *,
                add_merge: Callable[[list[str], dict], str] | None = None) -> Served:
        """A request body (chat or completion: ``model``, ``adapters``, ``merge``) to what the engine
        serves. ``who`` must be allowed every adapter named, else the adapter does not exist for it
        (404), checked for all of them before any is looked up. ``add_merge`` is the engine's
        ``add_merge``, for ``merge``. May block on registry reads (not for the base model alone): call it
        from a worker thread."""
        if req.adapters:
            if not self.is_base(req.model):
                raise InvalidAdapterError("with `adapters`, set `model` to the base model "
                                          f"({self.base_id}) or `base`")
            for a in req.adapters:  # every member authorized before any is looked up
                self.authorize(a.name, who)
            targets = [self.target(a.name, user, who) for a in req.adapters]
            weights = [a.weight for a in req.adapters]
            if req.merge is not None:
                if add_merge is None:
                    raise InvalidAdapterError("this server does not merge adapters")
                name = add_merge([t.engine_name for t in targets], {**req.merge.model_dump(), "weights": weights})
                return Served([(name, 1.0)], name, "merge", "", targets)
            mix = [(t.engine_name, w) for t, w in zip(targets, weights)]
            display = "+".join(f"{t.display}*{w:g}" for t, w in zip(targets, weights))
            return Served(mix, display, "mix", "", targets)
        if req.merge is not None:
            raise InvalidAdapterError("`merge` needs the `adapters` to merge")
        if self.is_base(req.model):
            return Served([], self.base_id, "base", "")
        t = self.target(req.model, user, who)
        return Served([(t.engine_name, 1.0)], t.display, t.name, t.version, [t])

    def add_local(self, name: str, path: str | Path, check: Callable[[str], None] | None = None) -> str:
        """Serve the adapter folder ``path`` as ``name`` (the admin load); ``check`` is the engine's
        ``check_adapter``, run on the folder before the name is taken. Returns the folder. Blocks on the
        folder's validation: call it from a worker thread."""
        check_name(name)
        folder = Path(path).expanduser()
        validate_adapter(folder, self.base_info)
        if check is not None:
            check(str(folder))
        self.local[name] = str(folder)
        return str(folder)

    def remove_local(self, name: str) -> None:
        """Stop serving an admin-loaded name; 404 when there is none."""
        if self.local.pop(name, None) is None:
            raise missing(name)

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
