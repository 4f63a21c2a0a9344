"""From the ``model`` a request names to the pinned adapters the engine serves.

``base`` or the base id: no adapter. ``NAME``: its A/B route if one exists (sticky per user), else
its latest version. ``NAME@7``, ``NAME@prod``: that version, that alias. ``BASE:NAME...``: the same,
with the base named. Names loaded through the admin API resolve to their folder. Every adapter is
pinned to ``NAME@VERSION`` here, so a request finishes on the version it started with whatever
moves meanwhile. Registry reads (aliases, latest, routes) are cached for ``ttl`` seconds; manifests
of versions are immutable and cached for good; ``refresh()`` drops the cache.

``resolve`` turns a whole request body (``model``, or an ``adapters`` mixture, or their ``merge``)
into what the engine serves, checked against the caller's key; ``add_local``/``remove_local`` are
the admin API's load and unload.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.adapters import AdapterRef, AdapterRegistry, BaseModelInfo
from loraplex.adapters.errors import InvalidAdapterError, InvalidNameError, NotFoundError
from loraplex.adapters.manifest import Manifest
from loraplex.adapters.reference import check_name
from loraplex.adapters.spec import validate_adapter

from .auth import Principal


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
                 routes=None, ttl: float = 5.0) -> None:
        self.registry = registry
        self.base_id = base_id
        self.base_info = base_info
        self.routes = routes  # adapters.routes.RouteStore or None
        self.ttl = ttl
        self.local: dict[str, str] = {}  # admin-loaded name -> folder (through add_local/remove_local)
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

    def resolve(self, req, user: str | None, who: Principal, *,
                add_merge: Callable[[list[str], dict], str] | None = None) -> Served:
        """A request body (chat or completion: ``model``, ``adapters``, ``merge``) to what the engine
        serves. ``who`` must be allowed every adapter named, else the adapter does not exist for it
        (404). ``add_merge`` is the engine's ``add_merge``, for ``merge``. Blocks on registry reads:
        call it from a worker thread."""
        if req.adapters:
            if not self.is_base(req.model):
                raise InvalidAdapterError("with `adapters`, set `model` to the base model "
                                          f"({self.base_id}) or `base`")
            targets = [self.target(a.name, user) for a in req.adapters]
            for t in targets:
                if not who.may_use(t.name):
                    raise NotFoundError(f"the model `{t.display}` does not exist")
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
        t = self.target(req.model, user)
        if not who.may_use(t.name):
            raise NotFoundError(f"the model `{req.model}` does not exist")
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
            raise NotFoundError(f"the model `{name}` does not exist")

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
