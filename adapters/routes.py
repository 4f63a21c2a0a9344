"""A/B routes stored in the registry, so every server replica splits traffic the same way.

A route maps a name clients ask for (``support-bot``) to weighted arms, each a pinned adapter
version (``support-bot@3`` 90, ``support-bot@4`` 10; an arm may name another adapter). Aliases and
``latest`` are resolved when the route is set and stored as ``NAME@VERSION``, so moving an alias
never changes a running experiment.

Layout under the registry's storage root (``_routes`` can never be an adapter name, since names
start with a letter or digit, so ``AdapterRegistry.names()`` ignores it)::

    _routes/NAME/0000000001.json   the route's log: one immutable entry per set or delete

Every entry is created exclusively (like the alias log): two concurrent ``set`` calls both compute
entry K+1, one wins, the loser re-reads and appends K+2, so no change is ever lost. The current
route is the last entry; a ``delete`` entry (no arms) is a tombstone. ``loraplex rm NAME@V`` refuses a
version that a current route has as an arm; ``rm --force`` appends an ``rm`` entry without that arm
(or a tombstone when it was the last arm) before the version disappears.

Picking an arm: with a user id, weighted rendezvous hashing (highest random weight). For each arm,
``u = sha256(route NAME, arm REF, user)`` mapped into (0, 1) and ``score = -weight / ln(u)``; the
highest score wins. The choice is deterministic across processes and replicas (no Python ``hash``),
each arm wins for a ``weight / total`` share of users, changing the weights moves only users from
shrinking arms to growing ones (about the difference in share), and adding or removing an arm only
moves users onto or off that arm. Without a user id, a weighted random choice.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real

from .errors import ConfigError, IntegrityError, NotFoundError, StorageError
from .reference import AdapterRef, check_name
from .registry import MAX_ENTRY_BYTES, AdapterRegistry, default_creator, now

ROUTES_PREFIX = "_routes"
MAX_ARMS = 16
_ENTRY_KEY = re.compile(r"^(\d{10})\.json$")
_MAX_RACE_RETRIES = 1000
_SYSTEM_RANDOM = random.SystemRandom()


@dataclass(frozen=True, slots=True)
class Arm:
    ref: str  # NAME@VERSION, pinned
    version: int
    weight: float  # relative: 90/10 is the same split as 9/1

    @property
    def name(self) -> str:
        return self.ref.partition("@")[0]

    def to_dict(self) -> dict:
        return {"ref": self.ref, "version": self.version, "weight": self.weight}


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    arms: tuple[Arm, ...]
    created_at: str
    by: str | None
    seq: int  # position in the route's log, from 1
    action: str = "set"  # set | rm (an arm removed with its version) | delete (a tombstone: no arms)

    @property
    def deleted(self) -> bool:
        return self.action == "delete"

    @property
    def shares(self) -> dict[str, float]:
        """Each arm's expected fraction of traffic (weights normalized to sum to 1)."""
        total = math.fsum(a.weight for a in self.arms)
        return {a.ref: a.weight / total for a in self.arms}

    def split_text(self) -> str:
        """``REF=W,REF=W``, the form ``parse_split`` and ``loraplex route --split`` read."""
        return ",".join(f"{a.ref}={a.weight:g}" for a in self.arms)

    def pick(self, user: str | None, rng: random.Random | None = None) -> Arm:
        """The arm serving this request: sticky per user, weighted random without one (None or "")."""
        if not self.arms:
            raise NotFoundError(f"route {self.name!r} was deleted; it has no arms")
        if len(self.arms) == 1:
            return self.arms[0]
        if user is None or user == "":
            x = (rng or _SYSTEM_RANDOM).random() * math.fsum(a.weight for a in self.arms)
            acc = 0.0
            for arm in self.arms:
                acc += arm.weight
                if x < acc:
                    return arm
            return self.arms[-1]  # rounding: x landed on the total
        user_text = str(user)
        return max(self.arms, key=lambda a: -a.weight / math.log(_unit_hash(self.name, a.ref, user_text)))

    def to_dict(self) -> dict:
        return {"name": self.name, "arms": [a.to_dict() for a in self.arms], "created_at": self.created_at,
                "by": self.by, "seq": self.seq, "action": self.action}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> Route:
        try:
            d = json.loads(raw)
            if not isinstance(d["arms"], list) or len(d["arms"]) > MAX_ARMS:
                raise ValueError(f"arms must be a list of at most {MAX_ARMS}")
            arms = tuple(Arm(str(a["ref"]), int(a["version"]), _check_weight(str(a["ref"]), a["weight"]))
                         for a in d["arms"])
            action = str(d.get("action", "set"))
            if action not in ("set", "rm", "delete") or (not arms and action != "delete"):
                raise ValueError(f"action {action[:20]!r} with {len(arms)} arms")
            by = d.get("by")
            return cls(str(d["name"]), arms, str(d["created_at"]), None if by is None else str(by)[:200],
                       int(d["seq"]), action)
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError, ConfigError) as exc:
            raise IntegrityError(f"route entry {where} is unreadable: {type(exc).__name__}: {str(exc)[:160]}") from None


def _unit_hash(route: str, ref: str, user: str) -> float:
    """A stable number strictly inside (0, 1) from sha256 of (route, arm, user)."""
    digest = hashlib.sha256(f"{route}\0{ref}\0{user}".encode("utf-8", "surrogatepass")).digest()
    return ((int.from_bytes(digest[:8], "big") >> 11) + 0.5) / 2.0**53


def _check_weight(ref: str, weight: object) -> float:
    if isinstance(weight, bool) or not isinstance(weight, Real):
        raise ConfigError(f"weight of {ref} must be a number, not {weight!r}")
    try:
        w = float(weight)
    except OverflowError:
        w = math.inf
    if not math.isfinite(w) or w <= 0:
        raise ConfigError(f"weight of {ref} must be a positive finite number, not {weight!r}")
    return w


def parse_split(text: str) -> list[tuple[str, float]]:
    """``"support-bot@3=90,support-bot@4=10"`` to ``[("support-bot@3", 90.0), ("support-bot@4", 10.0)]``.

    Weights are relative numbers (a trailing ``%`` is allowed); refs are checked for syntax only here.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("empty split: expected REF=WEIGHT[,REF=WEIGHT...], e.g. support-bot@3=90,support-bot@4=10")
    out: list[tuple[str, float]] = []
    for i, item in enumerate(text.split(","), 1):
        item = item.strip()
        if not item:
            raise ConfigError(f"split {text!r}: entry {i} is empty (stray comma?)")
        ref, eq, weight = item.rpartition("=")
        ref, weight = ref.strip(), weight.strip()
        if not eq or not ref:
            raise ConfigError(f"split {text!r}: entry {item!r} is not REF=WEIGHT")
        AdapterRef.parse(ref)  # InvalidNameError for a malformed ref
        try:
            w = float(weight[:-1] if weight.endswith("%") else weight)
        except ValueError:
            raise ConfigError(f"split {text!r}: weight {weight!r} of {ref} is not a number") from None
        out.append((ref, _check_weight(ref, w)))
    return out


class RouteStore:
    """Routes of one registry: set, get, history, delete, names."""

    def __init__(self, registry: AdapterRegistry) -> None:
        self.registry = registry
        self.storage = registry.storage
        self._cache: dict[str, tuple[float, Route | None]] = {}
        self._lock = threading.Lock()

    def _prefix(self, name: str) -> str:
        return f"{ROUTES_PREFIX}/{name}/"

    def _keys(self, name: str) -> list[tuple[int, str]]:
        out = []
        prefix = self._prefix(name)
        for key in self.storage.list(prefix):
            m = _ENTRY_KEY.match(key[len(prefix):])
            if m:
                out.append((int(m.group(1)), key))
        return sorted(out)

    # ---- reading ---------------------------------------------------------------------------
    def history(self, name: str) -> list[Route]:
        """Every entry of the route's log, oldest first, tombstones (``deleted``) included."""
        check_name(name, "route name")
        return [Route.from_json(self.storage.read(k, limit=MAX_ENTRY_BYTES), k) for _, k in self._keys(name)]

    def get(self, name: str) -> Route | None:
        """The current route, or None if it was never set or was deleted."""
        check_name(name, "route name")
        keys = self._keys(name)
        if not keys:
            return None
        route = Route.from_json(self.storage.read(keys[-1][1], limit=MAX_ENTRY_BYTES), keys[-1][1])
        return None if route.deleted else route

    def get_cached(self, name: str, max_age: float = 5.0) -> Route | None:
        """``get`` for a request path: re-read at most every max_age seconds per name (None is cached too)."""
        t = time.monotonic()
        with self._lock:
            hit = self._cache.get(name)
        if hit is not None and t - hit[0] < max_age:
            return hit[1]
        route = self.get(name)
        with self._lock:
            self._cache[name] = (t, route)
        return route

    def names(self) -> list[str]:
        """Names with a current (not deleted) route."""
        out = []
        for n in self.storage.children(f"{ROUTES_PREFIX}/"):
            if AdapterRegistry._is_name(n) and self.get(n) is not None:
                out.append(n)
        return out

    def using(self, ref: str) -> list[str]:
        """Names of the current routes with an arm pinned to ``ref`` (``NAME@VERSION``)."""
        out = []
        for n in self.storage.children(f"{ROUTES_PREFIX}/"):
            route = self.get(n) if AdapterRegistry._is_name(n) else None
            if route is not None and any(a.ref == ref for a in route.arms):
                out.append(n)
        return out

    # ---- writing ---------------------------------------------------------------------------
    def set(self, name: str, split: Mapping[str, float] | Sequence[tuple[str, float]], by: str | None = None) -> Route:
        """Validate the split, pin every ref to a version, and append it as the route's new entry."""
        check_name(name, "route name")
        arms = self._arms(split)
        return self._append(name, arms, "set", by)

    def delete(self, name: str, by: str | None = None) -> Route:
        """Append a tombstone; ``get`` answers None afterwards. NotFoundError if there is no current route."""
        check_name(name, "route name")
        if self.get(name) is None:
            raise NotFoundError(f"no route {name!r} in {self.registry.uri}")
        return self._append(name, (), "delete", by)

    def drop_arm(self, name: str, ref: str, by: str | None = None) -> Route | None:
        """Remove the arm pinned to ref from the current route (``rm --force``): an ``rm`` entry with the
        other arms, or a tombstone if it was the only one. None if the route has no such arm (any more).
        Re-reads and retries on a concurrent change, so it never overwrites another writer's split."""
        check_name(name, "route name")
        for _ in range(_MAX_RACE_RETRIES):
            keys = self._keys(name)
            current = Route.from_json(self.storage.read(keys[-1][1], limit=MAX_ENTRY_BYTES), keys[-1][1]) if keys else None
            if current is None or current.deleted or not any(a.ref == ref for a in current.arms):
                return None
            rest = tuple(a for a in current.arms if a.ref != ref)
            route = Route(name, rest, now(), by or default_creator(), keys[-1][0] + 1, "rm" if rest else "delete")
            if self._create(route):
                return route
        raise StorageError(f"could not update route {name!r}: too many concurrent changes")

    def _create(self, route: Route) -> bool:
        self.registry.check_exclusive_create()
        if self.storage.create(f"{self._prefix(route.name)}{route.seq:010d}.json", route.to_json()):
            with self._lock:
                self._cache.pop(route.name, None)
            return True
        return False

    def _arms(self, split: Mapping[str, float] | Sequence[tuple[str, float]]) -> tuple[Arm, ...]:
        if isinstance(split, Mapping):
            items = list(split.items())
        elif isinstance(split, (list, tuple)):
            items = list(split)
            for item in items:
                if not isinstance(item, (list, tuple)) or len(item) != 2:
                    raise ConfigError(f"split entry {item!r} is not a (ref, weight) pair")
        else:
            raise ConfigError(f"split must be a mapping or a list of (ref, weight) pairs, not {type(split).__name__}")
        if not items:
            raise ConfigError("empty split: a route needs at least one arm")
        if len(items) > MAX_ARMS:
            raise ConfigError(f"split has {len(items)} arms; at most {MAX_ARMS} are allowed")
        checked = []
        for ref, weight in items:
            if not isinstance(ref, str):
                raise ConfigError(f"split ref {ref!r} must be a string like NAME@VERSION")
            checked.append((ref, AdapterRef.parse(ref), _check_weight(ref, weight)))
        arms: list[Arm] = []
        given: dict[str, str] = {}
        for ref, parsed, weight in checked:
            m = self.registry.resolve(parsed)  # NotFoundError for an unknown name, version or alias
            pinned = f"{m.name}@{m.version}"
            if pinned in given:
                same = "" if given[pinned] == ref else f" (as {given[pinned]!r} and {ref!r})"
                raise ConfigError(f"split names {pinned} twice{same}; give each version once")
            given[pinned] = ref
            arms.append(Arm(pinned, m.version, weight))
        return tuple(arms)

    def _append(self, name: str, arms: tuple[Arm, ...], action: str, by: str | None) -> Route:
        by = by or default_creator()
        for _ in range(_MAX_RACE_RETRIES):
            keys = self._keys(name)
            seq = (keys[-1][0] if keys else 0) + 1
            route = Route(name, arms, now(), by, seq, action)
            if self._create(route):
                return route
        raise StorageError(f"could not update route {name!r}: too many concurrent changes")


__all__ = ["Arm", "MAX_ARMS", "ROUTES_PREFIX", "Route", "RouteStore", "parse_split"]
