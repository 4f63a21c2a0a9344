"""API keys: who may call the server, with which scopes, and on which adapters (tenant isolation).

Plain Python (no FastAPI, no torch, no environment reads): the app builds a :class:`KeyStore` at
startup from what its settings say and calls :meth:`KeyStore.authenticate` on every request.

Key file (YAML, or JSON since JSON is YAML)::

    keys:
      - name: acme-app              # shown in logs and metrics instead of the key
        key_sha256: 3f1c...         # preferred: the hex SHA-256 of the key's UTF-8 bytes
        scopes: [inference]         # inference | admin | metrics; default [inference]
        adapters: ["acme-*", "shared-faq"]   # fnmatch patterns of adapter NAMES; default ["*"]
        max_concurrent: 8           # generations in flight at once, else 429; default: no limit of its own
      - name: ops
        key: "plain-text-key-at-least-16"   # also accepted (for development); never logged
        scopes: [inference, admin, metrics]

Scopes: ``inference`` (chat, completions, the model list), ``admin`` (load, unload, pin, the adapters
list, refresh), ``metrics`` (``GET /metrics``, which shows every tenant's adapters and traffic, unless the
operator opens it). The adapter patterns bind every scope: an admin key with ``acme-*`` loads, unloads,
pins and lists only ``acme-*`` names. ``max_concurrent`` caps the key's generations in flight (429 past
it). Exactly one of ``key`` and ``key_sha256`` per entry. A single key given as a value (what
``LORAPLEX_API_KEY`` holds; the caller reads the environment) gets every scope and every adapter; one
given as ``LORAPLEX_METRICS_KEY`` only the ``metrics`` scope (for a Prometheus scrape).
No file and no key gives an open server: every request is let in with every scope.

Matching is constant time with respect to which key matched: the SHA-256 digest of the presented key
is compared with :func:`hmac.compare_digest` against every configured digest, without an early exit.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from loraplex.adapters.errors import ConfigError, LoraplexError

INFERENCE = "inference"
ADMIN = "admin"
METRICS = "metrics"
SCOPES = (INFERENCE, ADMIN, METRICS)
MIN_KEY_LENGTH = 16
ENV_KEY_NAME = "api-key"  # the name the single key from LORAPLEX_API_KEY has in logs and metrics
METRICS_KEY_NAME = "metrics-key"  # the key from LORAPLEX_METRICS_KEY: the metrics scope only

_FIELDS = ("name", "key", "key_sha256", "scopes", "adapters", "max_concurrent")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HASH_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_KEY_RE = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces: it travels in an HTTP header
_PATTERN_RE = re.compile(r"^[a-z0-9._*?\[\]!-]{1,63}$")
_BEARER_RE = re.compile(r"^\s*bearer\s+(\S+)\s*$", re.IGNORECASE)

UNAUTHENTICATED_MESSAGE = "invalid or missing API key"


class AuthenticationError(LoraplexError):
    """No API key, or one that no configured key matches (HTTP 401). Never carries the key."""

    status = 401
    type = "authentication_error"
    headers = {"WWW-Authenticate": "Bearer"}

    def __init__(self, message: str = UNAUTHENTICATED_MESSAGE) -> None:
        super().__init__(message)


class PermissionDeniedError(LoraplexError):
    """A valid key without the scope the operation needs (HTTP 403)."""

    status = 403
    type = "permission_error"


def hash_key(key: str) -> str:
    """The ``key_sha256`` value to put in the key file for ``key``."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> str:
    """A fresh random key (256 bits), e.g. for a ``loraplex`` command that prints a key and its hash."""
    return "lpx-" + secrets.token_urlsafe(32)


# ---- principals ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts as: a key's name, its scopes, the adapter name patterns it may use and the
    generations it may have in flight at once (None: no limit of its own)."""

    name: str
    scopes: frozenset[str]
    patterns: tuple[str, ...] = ("*",)
    max_concurrent: int | None = None

    def has(self, scope: str) -> bool:
        return scope in self.scopes

    def require(self, scope: str) -> None:
        """Raise :class:`PermissionDeniedError` (403) unless this principal holds ``scope``."""
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}")
        if scope not in self.scopes:
            raise PermissionDeniedError(f"API key {self.name!r} lacks the {scope!r} scope")

    @property
    def all_adapters(self) -> bool:
        return "*" in self.patterns

    def may_use(self, adapter: str) -> bool:
        """Whether an adapter name (or reference ``NAME@VERSION``/``NAME@ALIAS``) is this key's to use.

        Only the name is matched (``@...`` is ignored), case-sensitively. The base model is not an
        adapter: whether a restricted key may call it is the app's decision.
        """
        if self.all_adapters:
            return True
        name = adapter.partition("@")[0]
        return any(fnmatchcase(name, p) for p in self.patterns)

    def visible(self, names: Iterable[str]) -> list[str]:
        """The names (or references) this key may use, in their order: for model listings."""
        return [n for n in names if self.may_use(n)]

    def cache_salt(self, requested: str | None) -> str | None:
        """The prefix-cache salt of this key's requests: cached KV blocks are shared between the requests of one
        key (the same adapter content too), never between keys, so a tenant cannot tell from a fast first token
        that another tenant sent the same prompt to a shared adapter. A request's own ``cache_salt`` (vLLM's
        field) narrows it further. Without API keys (one open server) only a request's own salt applies."""
        if self is OPEN_PRINCIPAL:
            return requested
        return f"key:{self.name}" if requested is None else f"key:{self.name}\x00{requested}"


OPEN_PRINCIPAL = Principal("anonymous", frozenset(SCOPES), ("*",))


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One configured key: only its SHA-256 digest is kept."""

    name: str
    digest: bytes = field(repr=False)
    scopes: frozenset[str]
    patterns: tuple[str, ...]
    max_concurrent: int | None = None

    @property
    def principal(self) -> Principal:
        return Principal(self.name, self.scopes, self.patterns, self.max_concurrent)


# ---- the store ------------------------------------------------------------------------------------


class KeyStore:
    """The configured keys; empty means an open server."""

    def __init__(self, keys: Sequence[ApiKey] = (), *, source: str = "") -> None:
        self._keys = tuple(keys)
        self._principals = tuple(k.principal for k in self._keys)
        self.source = source

    # constructors
    @classmethod
    def open(cls) -> KeyStore:
        """No keys: every request is let in as :data:`OPEN_PRINCIPAL` (all scopes, all adapters)."""
        return cls((), source="open")

    @classmethod
    def from_api_key(cls, api_key: str) -> KeyStore:
        """A single key (``LORAPLEX_API_KEY`` semantics): all scopes, all adapters."""
        return cls([_env_key(api_key)], source="LORAPLEX_API_KEY")

    @classmethod
    def from_keys(cls, entries: Sequence[Mapping], *, api_key: str | None = None, source: str = "keys") -> KeyStore:
        """Keys given as the ``keys:`` list of a key file (validated the same way)."""
        keys = _parse_entries(entries, source)
        if api_key is not None:
            keys.append(_env_key(api_key))
            _check_duplicates(keys, source)
        return cls(keys, source=source)

    @classmethod
    def from_file(cls, path: str | Path, *, api_key: str | None = None) -> KeyStore:
        """Keys from a YAML/JSON key file, plus the single ``api_key`` if one is given."""
        path = Path(path)
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"API key file {path} is unreadable: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" at line {where.line + 1}" if where is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"API key file {path}: not valid YAML or JSON{at}: {problem}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"API key file {path}: not UTF-8 text") from None
        if not isinstance(data, dict):
            raise ConfigError(f"API key file {path}: expected a mapping with a 'keys' list")
        unknown = sorted(map(str, set(data) - {"keys"}))
        if unknown:
            raise ConfigError(f"API key file {path}: unknown field(s) {', '.join(unknown)} (expected 'keys')")
        if "keys" not in data:
            raise ConfigError(f"API key file {path}: missing 'keys' list")
        return cls.from_keys(data["keys"], api_key=api_key, source=str(path))

    @classmethod
    def load(cls, path: str | Path | None = None, api_key: str | None = None,
             metrics_key: str | None = None) -> KeyStore:
        """What the app calls with its settings: a file and/or a single key, else an open server; plus a key
        that may only read ``/metrics`` (``LORAPLEX_METRICS_KEY``, what a Prometheus scrape presents)."""
        if path:
            store = cls.from_file(path, api_key=api_key)
        elif api_key is not None:
            store = cls.from_api_key(api_key)
        else:
            store = cls.open()
        if metrics_key is None:
            return store
        if store.is_open:
            raise ConfigError("LORAPLEX_METRICS_KEY needs API keys as well: without them the server is open "
                              "(set LORAPLEX_API_KEY or LORAPLEX_API_KEYS_FILE)")
        keys = [*store._keys, _env_key(metrics_key, METRICS_KEY_NAME, frozenset({METRICS}), "LORAPLEX_METRICS_KEY")]
        _check_duplicates(keys, store.source)
        return cls(keys, source=store.source)

    # queries
    @property
    def is_open(self) -> bool:
        return not self._keys

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def names(self) -> list[str]:
        return [k.name for k in self._keys]

    def describe(self) -> str:
        """One line for the startup log; never contains a key."""
        if self.is_open:
            return "no API key configured: the server is open to anyone who can reach it"
        n = len(self._keys)
        inference = sum(INFERENCE in k.scopes for k in self._keys)
        admin = sum(ADMIN in k.scopes for k in self._keys)
        metrics = sum(METRICS in k.scopes for k in self._keys)
        restricted = sum("*" not in k.patterns for k in self._keys)
        limited = sum(k.max_concurrent is not None for k in self._keys)
        tail = f"; {restricted} limited to some adapters" if restricted else ""
        tail += f"; {limited} with a concurrency limit" if limited else ""
        return f"{n} API key{'s' if n != 1 else ''} ({inference} inference, {admin} admin, {metrics} metrics{tail})"

    def authenticate(self, authorization: str | None, x_api_key: str | None = None) -> Principal:
        """The principal of a request, from ``Authorization: Bearer KEY`` or else ``x-api-key: KEY``.

        An open store lets everything in. Otherwise a missing or unknown key raises
        :class:`AuthenticationError` (401) whose message never contains what was sent.
        """
        if self.is_open:
            return OPEN_PRINCIPAL
        token = None
        if authorization:
            m = _BEARER_RE.match(authorization)
            if m:
                token = m.group(1)
        if token is None and x_api_key:
            token = x_api_key.strip() or None
        if token is None:
            raise AuthenticationError()
        digest = hashlib.sha256(token.encode("utf-8", "replace")).digest()
        found = -1
        for i, key in enumerate(self._keys):  # every key, no early exit
            match = hmac.compare_digest(digest, key.digest)
            found = i if (match and found < 0) else found
        if found < 0:
            raise AuthenticationError()
        return self._principals[found]


# ---- parsing ----------------------------------------------------------------------------------------


def _env_key(api_key: str, name: str = "", scopes: frozenset[str] = frozenset(SCOPES),
             where: str = "LORAPLEX_API_KEY") -> ApiKey:
    if not isinstance(api_key, str):
        raise ConfigError(f"{where} must be a string")
    key = api_key.strip()
    _check_plain_key(key, where)
    return ApiKey(name or ENV_KEY_NAME, hashlib.sha256(key.encode("utf-8")).digest(), scopes, ("*",))


def _check_plain_key(key: str, where: str) -> None:
    if not key:
        raise ConfigError(f"{where}: empty key")
    if len(key) < MIN_KEY_LENGTH:
        raise ConfigError(f"{where}: key shorter than {MIN_KEY_LENGTH} characters")
    if not _KEY_RE.match(key):
        raise ConfigError(f"{where}: key must be printable ASCII without spaces")


def _parse_entries(entries, source: str) -> list[ApiKey]:
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: 'keys' must be a list of key entries")
    if not entries:
        raise ConfigError(f"{source}: 'keys' is empty (remove the key file for an open server)")
    keys = [_parse_entry(e, f"{source}: keys[{i}]") for i, e in enumerate(entries)]
    _check_duplicates(keys, source)
    return keys


def _parse_entry(entry, where: str) -> ApiKey:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a mapping with name, key or key_sha256, scopes, adapters, max_concurrent")
    name = entry.get("name")
    if isinstance(name, str) and name:
        where = f"{where} ({name})"
    unknown = sorted(map(str, set(entry) - set(_FIELDS)))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)} (expected {', '.join(_FIELDS)})")
    if name is None:
        raise ConfigError(f"{where}: missing 'name'")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"{where}: invalid name: use 1-64 characters from A-Z a-z 0-9 . _ - starting with a letter or digit")

    has_key, has_hash = "key" in entry, "key_sha256" in entry
    if has_key == has_hash:
        raise ConfigError(f"{where}: give exactly one of 'key' and 'key_sha256'")
    if has_key:
        key = entry["key"]
        if key is None:
            raise ConfigError(f"{where}: empty key")
        if not isinstance(key, str):
            raise ConfigError(f"{where}: key must be a string (quote it)")
        _check_plain_key(key, where)
        digest = hashlib.sha256(key.encode("utf-8")).digest()
    else:
        value = entry["key_sha256"]
        if not isinstance(value, str) or not _HASH_RE.match(value):
            raise ConfigError(f"{where}: key_sha256 must be 64 hexadecimal characters (a SHA-256 digest)")
        digest = bytes.fromhex(value)

    scopes = entry.get("scopes", [INFERENCE])
    if isinstance(scopes, str):
        scopes = [scopes]
    if not isinstance(scopes, list) or not scopes:
        raise ConfigError(f"{where}: scopes must be a non-empty list of {', '.join(SCOPES)}")
    for s in scopes:
        if s not in SCOPES:
            raise ConfigError(f"{where}: unknown scope {s!r} (expected {', '.join(SCOPES)})")

    patterns = entry.get("adapters", ["*"])
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, list) or not patterns:
        raise ConfigError(f"{where}: adapters must be a non-empty list of adapter name patterns")
    for p in patterns:
        if not isinstance(p, str) or not _PATTERN_RE.match(p):
            raise ConfigError(
                f"{where}: invalid adapter pattern {p!r}: use adapter name characters a-z 0-9 . _ - "
                "and the wildcards * ? [ ] (no @version)"
            )

    limit = entry.get("max_concurrent")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"{where}: max_concurrent must be a whole number >= 1 (or left out: no limit)")
    return ApiKey(name, digest, frozenset(scopes), tuple(dict.fromkeys(patterns)), limit)


def _check_duplicates(keys: Sequence[ApiKey], source: str) -> None:
    names: set[str] = set()
    digests: dict[bytes, str] = {}
    for k in keys:
        if k.name in names:
            raise ConfigError(f"{source}: duplicate key name {k.name!r}")
        names.add(k.name)
        if k.digest in digests:
            raise ConfigError(f"{source}: keys {digests[k.digest]!r} and {k.name!r} are the same key")
        digests[k.digest] = k.name
