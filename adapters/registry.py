"""The versioned adapter registry: push, list, show, pull, tag, rollback, remove.

Layout under the storage root (one folder per adapter name)::

    NAME/vN/.claim                      who took version number N (kept forever: numbers are never reused)
    NAME/vN/adapter_config.json
    NAME/vN/adapter_model.safetensors
    NAME/vN/manifest.json               written last and exclusively: its presence makes vN visible
    NAME/aliases/ALIAS/0000000007.json  the alias log: one immutable entry per move

Races this layout prevents: two pushers of one name both computing N (the ``.claim`` is an
exclusive create, so the loser moves on to N+1 before writing any file); a reader seeing a version
whose files are still uploading (the manifest is written after the files); a push killed midway
(no manifest, so nothing is visible, and the re-run claims a fresh number); two concurrent alias
moves losing one of them (each appends log entry K+1 exclusively, the loser re-reads and retries).
``latest`` is not stored: it is always the highest visible version.

What this layout relies on, checked rather than assumed: ``create`` must be exclusive, so before its
first write a registry object probes the store (``storage.check_exclusive_create``) and refuses to
write to one that ignores ``If-None-Match: *``; every manifest is validated when it is read
(``Manifest.from_json``: file names, sha256 strings, sizes, name and version); every download is capped
and verified (``AdapterCache``). ``remove`` refuses a version an alias or an A/B route arm points at.
"""

from __future__ import annotations

import getpass
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from .basemodel import BaseModelInfo, resolve_base_model
from .cache import AdapterCache
from .errors import (
    ConfigError, ConflictError, IncompatibleBaseError, IntegrityError, InvalidNameError, NotFoundError, StorageError,
)
from .manifest import MAX_MANIFEST_BYTES, MAX_MESSAGE, MAX_TRAINING_BYTES, Manifest, check_text, hash_file
from .reference import LATEST, AdapterRef, check_alias, check_name
from .spec import ADAPTER_FILES, CONFIG_FILE, WEIGHTS_FILE, Limits, validate_adapter
from .storage import ProgressFactory, Storage, check_exclusive_create, open_storage

_VERSION_KEY = re.compile(r"^v(\d+)/(manifest\.json|\.claim)$")
_MAX_RACE_RETRIES = 1000
MAX_ENTRY_BYTES = 64 * 1024  # an alias or route log entry is ~200 bytes


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def default_creator() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except Exception:  # no user database entry in some containers
        return f"unknown@{socket.gethostname()}"


@dataclass(frozen=True, slots=True)
class AliasEvent:
    alias: str
    version: int | None  # None: the alias was removed
    previous: int | None
    at: str
    by: str | None
    action: str  # tag | rollback | push | rm

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()


@dataclass(frozen=True, slots=True)
class PushResult:
    manifest: Manifest
    created: bool  # False: identical content already stored as manifest.version
    alias: AliasEvent | None = None


class AdapterRegistry:
    """Python API of the registry; the CLI is a thin layer over it."""

    def __init__(self, storage: Storage | str, *, limits: Limits = Limits(), cache: AdapterCache | None = None) -> None:
        self.storage = open_storage(storage) if isinstance(storage, str) else storage
        self.limits = limits
        self.cache = cache
        # (name, version) -> (when last read from the store, manifest). A manifest's bytes never change
        # once visible; only whether it is still visible (``rm``) does: see ``manifest(max_age=...)``.
        self._manifests: dict[tuple[str, int], tuple[float, Manifest]] = {}
        self._exclusive_checked = False
        self._probe_lock = threading.Lock()

    @property
    def uri(self) -> str:
        return self.storage.uri

    # ---- reading ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        return [n for n in self.storage.children("") if self._is_name(n) and self._numbers(n)[0]]

    @staticmethod
    def _is_name(n: str) -> bool:
        try:
            check_name(n)
            return True
        except Exception:
            return False

    def _numbers(self, name: str) -> tuple[list[int], int]:
        """(visible version numbers ascending, highest number ever claimed)."""
        visible, claimed = [], 0
        for key in self.storage.list(f"{name}/"):
            m = _VERSION_KEY.match(key[len(name) + 1:])
            if m:
                n = int(m.group(1))
                claimed = max(claimed, n)
                if m.group(2) == "manifest.json":
                    visible.append(n)
        return sorted(visible), claimed

    def version_numbers(self, name: str) -> list[int]:
        return self._numbers(check_name(name))[0]

    def manifest(self, name: str, version: int, *, max_age: float | None = None) -> Manifest:
        """The validated manifest of ``name@version``; NotFoundError if it is not (or no longer) visible.

        Read once and kept (its bytes are immutable). With ``max_age`` (seconds), a kept manifest older than
        that is read again, so a version removed meanwhile (by another process) stops resolving: a server
        passes its TTL here. If that re-read fails with a StorageError (store down), the kept manifest is
        served (stale-while-error): only NotFound evicts it."""
        check_name(name)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise InvalidNameError(f"invalid version {version!r} of {name}: versions are 1, 2, 3 ...")
        key = (name, version)
        hit = self._manifests.get(key)
        if hit is not None and (max_age is None or time.monotonic() - hit[0] < max_age):
            return hit[1]
        try:
            raw = self.storage.read(f"{name}/v{version}/manifest.json", limit=MAX_MANIFEST_BYTES)
        except NotFoundError:
            self._manifests.pop(key, None)
            raise NotFoundError(f"adapter {name}@{version} not found in {self.uri}") from None
        except IntegrityError:
            raise IntegrityError(f"manifest {name}@{version} is invalid: larger than {MAX_MANIFEST_BYTES} bytes") from None
        except StorageError:
            if hit is not None:
                return hit[1]
            raise
        m = Manifest.from_json(raw, f"{name}@{version}", name=name, version=version, limits=self.limits)
        self._manifests[key] = (time.monotonic(), m)
        return m

    def versions(self, name: str) -> list[Manifest]:
        return [self.manifest(name, v) for v in self.version_numbers(name)]

    def alias_history(self, name: str, alias: str) -> list[AliasEvent]:
        check_name(name)
        check_alias(alias)
        prefix = f"{name}/aliases/{alias}/"
        return [_alias_event(self.storage.read(k, limit=MAX_ENTRY_BYTES), k) for k in self.storage.list(prefix)]

    def aliases(self, name: str) -> dict[str, int]:
        """Every alias of name and the version it points at, ``latest`` included."""
        check_name(name)
        out: dict[str, int] = {}
        visible = self.version_numbers(name)
        if visible:
            out[LATEST] = visible[-1]
        for alias in self.storage.children(f"{name}/aliases/"):
            events = self.alias_history(name, alias)
            if events and events[-1].version is not None:
                out[alias] = events[-1].version
        return out

    def resolve(self, ref: str | AdapterRef, *, max_age: float | None = None) -> Manifest:
        """``NAME``, ``NAME@7`` or ``NAME@prod`` to the manifest of one version (``max_age``: see ``manifest``)."""
        r = AdapterRef.parse(ref) if isinstance(ref, str) else ref
        if r.version is not None:
            return self.manifest(r.name, r.version, max_age=max_age)
        if r.alias is None:
            visible = self.version_numbers(r.name)
            if not visible:
                raise NotFoundError(f"adapter {r.name!r} not found in {self.uri}")
            return self.manifest(r.name, visible[-1], max_age=max_age)
        events = self.alias_history(r.name, r.alias)
        if not events or events[-1].version is None:
            if not self.version_numbers(r.name):
                raise NotFoundError(f"adapter {r.name!r} not found in {self.uri}")
            raise NotFoundError(f"adapter {r.name!r} has no alias {r.alias!r}")
        return self.manifest(r.name, events[-1].version, max_age=max_age)

    # ---- writing -----------------------------------------------------------------------------
    def check_exclusive_create(self) -> None:
        """Before this object's first write: refuse a store whose exclusive create is not exclusive
        (ConditionalWriteError). Every write path (push, tag, rollback, rm, routes) calls it; it probes once."""
        if self._exclusive_checked:
            return
        with self._probe_lock:
            if not self._exclusive_checked:
                check_exclusive_create(self.storage)
                self._exclusive_checked = True

    # ---- pushing ---------------------------------------------------------------------------
    def push(
        self, folder: str | Path, name: str, *, alias: str | None = None, base_model: str | None = None,
        message: str = "", creator: str | None = None, training: dict | None = None, force: bool = False,
        progress: ProgressFactory | None = None,
    ) -> PushResult:
        check_name(name)
        check_text(message, "the message", MAX_MESSAGE, multiline=True)
        if creator is not None:
            check_text(creator, "the creator")
        if training is not None and len(json.dumps(training, default=str)) > MAX_TRAINING_BYTES:
            raise InvalidNameError(f"the training record is larger than {MAX_TRAINING_BYTES} bytes as JSON")
        if alias is not None:
            check_alias(alias)
            if alias == LATEST:
                raise ConflictError("'latest' always follows the newest version; it cannot be set")
        folder = Path(folder)
        base_id, base = self._base_for(folder, base_model)
        if base_id is not None:
            check_text(base_id, "the base model id")
        spec = validate_adapter(folder, base, self.limits)
        files = {f: hash_file(folder / f) for f in ADAPTER_FILES}
        if not force:
            for existing in self.versions(name):
                if existing.files == files:
                    return PushResult(existing, created=False)
        version = self._claim(name)
        for fname in ADAPTER_FILES:
            self._upload(f"{name}/v{version}/{fname}", folder / fname, files[fname].size, progress, f"{name}@{version} {fname}")
        manifest = Manifest(
            name=name, version=version, files=files, base_model=base_id,
            base_fingerprint=base.to_dict() if base else None, rank=spec.rank, alpha=spec.alpha,
            target_modules=spec.target_modules, use_rslora=spec.use_rslora, use_dora=spec.use_dora,
            modules=len(spec.modules), num_params=spec.num_params, dtype=spec.dtype, created_at=now(),
            creator=creator or default_creator(), message=message, training=training,
        )
        if not self.storage.create(f"{name}/v{version}/manifest.json", manifest.to_json()):
            raise StorageError(f"{name}@{version} was published by someone else although this push claimed it")
        self._manifests[(name, version)] = (time.monotonic(), manifest)
        event = self.tag(manifest.ref, alias, action="push", by=creator) if alias else None
        return PushResult(manifest, created=True, alias=event)

    def _base_for(self, folder: Path, base_model: str | None) -> tuple[str | None, BaseModelInfo | None]:
        if base_model is not None:
            if base_model.startswith((".", "/", "~")) and not Path(base_model).expanduser().is_dir():
                raise ConfigError(f"base model folder {base_model} does not exist")
            base = resolve_base_model(base_model)
            return (base.id if base else base_model), base
        try:
            declared = json.loads((folder / CONFIG_FILE).read_text()).get("base_model_name_or_path")
        except Exception:
            return None, None  # validate_adapter reports the broken config precisely
        if isinstance(declared, str) and declared:
            base = resolve_base_model(declared)
            return (base.id if base else declared), base
        return None, None

    def _claim(self, name: str) -> int:
        self.check_exclusive_create()
        token = json.dumps({"token": uuid.uuid4().hex, "at": now()}).encode()
        _, claimed = self._numbers(name)
        for _ in range(_MAX_RACE_RETRIES):
            claimed += 1
            if self.storage.create(f"{name}/v{claimed}/.claim", token):
                return claimed
        raise StorageError(f"could not claim a version number for {name!r}: too many concurrent pushes")

    def _upload(self, key: str, path: Path, size: int, progress: ProgressFactory | None, label: str) -> None:
        if progress is None:
            self.storage.upload(key, path)
            return
        with progress(label, size) as update:
            self.storage.upload(key, path, update)

    # ---- aliases -----------------------------------------------------------------------------
    def tag(self, ref: str, alias: str, *, action: str = "tag", by: str | None = None) -> AliasEvent:
        """Point alias at the version ref names (``NAME@7``, or ``NAME@other-alias``)."""
        check_alias(alias)
        if alias == LATEST:
            raise ConflictError("'latest' always follows the newest version; it cannot be set")
        target = self.resolve(ref)
        return self._move(target.name, alias, lambda _cur: target.version, action, by)

    def rollback(self, name: str, alias: str, *, by: str | None = None) -> AliasEvent:
        """Undo the alias's last move: point it back where it was before (twice redoes it)."""
        check_name(name)
        check_alias(alias)
        if not self.version_numbers(name):
            raise NotFoundError(f"adapter {name!r} not found in {self.uri}")

        def previous(events: list[AliasEvent]) -> int:
            if not events or events[-1].previous is None:
                raise ConflictError(f"alias {name}@{alias} has no earlier version to roll back to")
            self.manifest(name, events[-1].previous)  # refuse a target that was removed
            return events[-1].previous

        return self._move(name, alias, previous, "rollback", by)

    def _move(self, name: str, alias: str, choose: Callable[[list[AliasEvent]], int | None], action: str, by: str | None) -> AliasEvent:
        self.check_exclusive_create()
        prefix = f"{name}/aliases/{alias}/"
        for _ in range(_MAX_RACE_RETRIES):
            events = self.alias_history(name, alias)
            current = events[-1].version if events else None
            target = choose(events)
            event = AliasEvent(alias, target, current, now(), by or default_creator(), action)
            if self.storage.create(f"{prefix}{len(events) + 1:010d}.json", event.to_json()):
                return event
        raise StorageError(f"could not move alias {name}@{alias}: too many concurrent moves")

    # ---- removing ----------------------------------------------------------------------------
    def remove(self, ref: str, *, force: bool = False, by: str | None = None) -> Manifest | None:
        """Make a version invisible and delete its files. Refused (ConflictError) while an alias or an A/B
        route arm points at it; ``force`` first removes those aliases and those arms (a route left without
        arms is deleted). The version number is never reused. A version whose manifest is invalid (tampered
        with) is removed only with ``force``, and then None is returned."""
        from .routes import RouteStore  # routes builds on this module

        r = AdapterRef.parse(ref)
        if r.version is None:
            raise ConflictError(f"rm needs an explicit version (NAME@N), not {ref!r}")
        pinned = f"{r.name}@{r.version}"
        try:
            manifest: Manifest | None = self.manifest(r.name, r.version, max_age=0)
        except IntegrityError as exc:
            if not force:
                raise IntegrityError(f"{exc}; `loraplex rm {pinned} --force` removes it") from None
            manifest = None
        pointing = sorted(a for a, v in self.aliases(r.name).items() if v == r.version and a != LATEST)
        routes = RouteStore(self)
        arms_of = routes.using(pinned)
        if (pointing or arms_of) and not force:
            what = ([f"pointed at by alias {', '.join(pointing)}"] if pointing else []) + \
                   ([f"an arm of route {', '.join(arms_of)}"] if arms_of else [])
            todo = (["move the alias"] if pointing else []) + (["change the route"] if arms_of else [])
            raise ConflictError(f"{pinned} is {' and is '.join(what)}; {' and '.join(todo)} first or use --force")
        for route in arms_of:  # first, so no server keeps routing traffic to the version
            routes.drop_arm(route, pinned, by=by)
        for alias in pointing:
            self._move(r.name, alias, lambda _e: None, "rm", by)
        # The manifest goes first so the version is invisible before any file disappears.
        self.storage.delete(f"{r.name}/v{r.version}/manifest.json")
        for fname in ADAPTER_FILES:
            self.storage.delete(f"{r.name}/v{r.version}/{fname}")
        self._manifests.pop((r.name, r.version), None)
        return manifest

    # ---- pulling -----------------------------------------------------------------------------
    def fetch(self, ref: str, *, progress: ProgressFactory | None = None) -> tuple[Manifest, Path]:
        """Resolve ref and return a verified, validated local folder for it from the cache."""
        manifest = self.resolve(ref)
        cache = self.cache or AdapterCache.default(self.limits)
        folder = cache.materialize(self.storage, manifest, progress)
        return manifest, folder

    def pull(self, ref: str, dest: str | Path, *, progress: ProgressFactory | None = None) -> Manifest:
        manifest, folder = self.fetch(ref, progress=progress)
        AdapterCache.export(folder, Path(dest), manifest)
        return manifest

    def check_base(self, manifest: Manifest, base: BaseModelInfo) -> None:
        """Refuse an adapter stored for a different base architecture."""
        fp = (manifest.base_fingerprint or {}).get("fingerprint")
        if fp is not None and fp != base.fingerprint:
            raise IncompatibleBaseError(
                f"{manifest.ref} was made for base model {manifest.base_model} ({fp}), not {base.id} ({base.fingerprint})"
            )


def _alias_event(raw: bytes, where: str) -> AliasEvent:
    try:
        event = AliasEvent(**json.loads(raw))
        for field in ("version", "previous"):
            v = getattr(event, field)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{field} must be a version number >= 1 or null")
        if not all(isinstance(x, str) for x in (event.alias, event.at, event.action)):
            raise ValueError("alias, at and action must be strings")
        return event
    except (ValueError, TypeError, RecursionError) as exc:
        raise IntegrityError(f"alias entry {where} is unreadable: {type(exc).__name__}: {str(exc)[:160]}") from None


__all__ = ["AdapterRegistry", "AliasEvent", "PushResult", "WEIGHTS_FILE"]
