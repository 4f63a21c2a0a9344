"""The manifest of one adapter version: what its files are, what it was made for and by whom.

Stored as ``NAME/vN/manifest.json``; writing it (exclusively) is what makes a version visible.

A manifest is read from a store that others can write, so ``Manifest.from_json`` trusts none of it:
every read checks that the files are exactly the adapter's two files (``adapter_config.json``,
``adapter_model.safetensors``: never a path, ``..`` or an extra name, since the cache turns file names
into paths and sha256 strings into blob names), that each sha256 is 64 lowercase hex digits, that each
size is an integer within the limits a push enforces (``spec.Limits``), that name and version are the
ones the manifest was read under, and that every other field has its type. Anything else is an
``IntegrityError`` with a one-line reason.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .basemodel import BaseModelInfo
from .errors import IntegrityError, InvalidNameError
from .reference import check_name
from .spec import ADAPTER_FILES, CONFIG_FILE, WEIGHTS_FILE, Limits

FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 1024 * 1024  # a real manifest is ~2 KB; a bigger one is refused before parsing
SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class Manifest:
    name: str
    version: int
    files: dict[str, FileEntry]
    base_model: str | None
    base_fingerprint: dict | None  # BaseModelInfo.to_dict(), or None when the base was unknown
    rank: int
    alpha: float
    target_modules: list[str] | str
    use_rslora: bool
    use_dora: bool
    modules: int
    num_params: int
    dtype: str
    created_at: str
    creator: str | None
    message: str
    training: dict | None = None
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def content_sha256(self) -> str:
        return content_hash(self.files)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_json(self) -> bytes:
        data = asdict(self)
        data["content_sha256"] = self.content_sha256
        return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str, *, name: str | None = None, version: int | None = None,
                  limits: Limits = Limits()) -> Manifest:
        """Parse and validate a stored manifest; ``name``/``version``: where it was read (must agree).

        Raises IntegrityError ``manifest WHERE is unreadable|invalid: REASON`` (one line)."""
        if len(raw) > MAX_MANIFEST_BYTES:
            raise IntegrityError(f"manifest {where} is invalid: {len(raw)} bytes, above the limit of {MAX_MANIFEST_BYTES}")
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise IntegrityError(f"manifest {where} is unreadable: {_one_line(exc)}") from None
        try:
            return cls(**_checked(data, name, version, limits))
        except _Invalid as exc:
            raise IntegrityError(f"manifest {where} is invalid: {exc}") from None


def file_limits(limits: Limits) -> dict[str, int]:
    """The largest size each adapter file may have (what ``push`` enforces)."""
    return {CONFIG_FILE: limits.max_config_bytes, WEIGHTS_FILE: limits.max_bytes}


class _Invalid(Exception):
    pass


def _one_line(value: object, n: int = 160) -> str:
    text = repr(value) if not isinstance(value, BaseException) else str(value)
    text = text.replace("\n", " ").replace("\r", " ")
    return text if len(text) <= n else text[: n - 3] + "..."


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _need(cond: bool, reason: str) -> None:
    if not cond:
        raise _Invalid(reason)


def _check_files(files: object, limits: Limits) -> dict[str, FileEntry]:
    _need(isinstance(files, dict), f"files must be an object, got {_one_line(files)}")
    for fname in files:
        _need(fname in ADAPTER_FILES,
              f"file name {_one_line(fname)} is not one of the adapter's files ({', '.join(ADAPTER_FILES)})")
    missing = [f for f in ADAPTER_FILES if f not in files]
    _need(not missing, f"files lack {', '.join(missing)}")
    caps = file_limits(limits)
    out = {}
    for fname in ADAPTER_FILES:
        entry = files[fname]
        _need(isinstance(entry, dict) and set(entry) == {"sha256", "size"},
              f"{fname}: expected exactly sha256 and size, got {_one_line(entry)}")
        sha, size = entry["sha256"], entry["size"]
        _need(isinstance(sha, str) and SHA256_RE.fullmatch(sha) is not None,
              f"{fname}: sha256 must be 64 lowercase hex digits, got {_one_line(sha)}")
        _need(_is_int(size) and size >= 0, f"{fname}: size must be a non-negative integer, got {_one_line(size)}")
        _need(size <= caps[fname], f"{fname}: size {size} is above the limit of {caps[fname]} bytes")
        out[fname] = FileEntry(sha, size)
    return out


def _check_fingerprint(fp: object) -> None:
    if fp is None:
        return
    _need(isinstance(fp, dict), f"base_fingerprint must be an object or null, got {_one_line(fp)}")
    try:
        info = BaseModelInfo.from_dict(fp)
    except (KeyError, TypeError) as exc:
        raise _Invalid(f"base_fingerprint lacks {exc}") from None
    for k, v in asdict(info).items():
        ok = isinstance(v, str) if k in ("id", "model_type") else _is_int(v) and v > 0
        _need(ok, f"base_fingerprint.{k} has a bad value {_one_line(v)}")
    _need(fp.get("fingerprint") == info.fingerprint,
          f"base_fingerprint.fingerprint {_one_line(fp.get('fingerprint'))} does not match its fields ({info.fingerprint})")


MAX_SHORT_TEXT = 1024  # characters of a one-line field (base_model, dtype, creator, created_at, a target module)
MAX_MESSAGE = 8192  # characters of a version's message
MAX_TRAINING_BYTES = 256 * 1024  # the training record as JSON
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # what a terminal may act on (tab and newline aside)


def text_problem(value: object, limit: int = MAX_SHORT_TEXT, multiline: bool = False) -> str | None:
    """Why ``value`` is not a string a terminal or a log may show as it is (None: it is). Manifests are read
    from a bucket anyone with write access may fill, and the CLI prints these fields."""
    if not isinstance(value, str):
        return "must be a string"
    if len(value) > limit:
        return f"is {len(value)} characters long, above the limit of {limit}"
    if _CONTROL.search(value) or (not multiline and ("\n" in value or "\t" in value)):
        return "contains control characters"
    return None


def check_text(value: object, what: str, limit: int = MAX_SHORT_TEXT, multiline: bool = False) -> None:
    """Raise ``InvalidNameError`` (a 400, one line) when ``value`` is not printable text within ``limit``."""
    problem = text_problem(value, limit, multiline)
    if problem is not None:
        raise InvalidNameError(f"{what} {problem}")


def _text(limit: int = MAX_SHORT_TEXT, multiline: bool = False, null: bool = False):
    return lambda v: (null and v is None) or text_problem(v, limit, multiline) is None


def _json_size(v: object) -> int:
    return len(json.dumps(v, separators=(",", ":")))


# field -> (check, what it must be)
_FIELD_TYPES = {
    "base_model": (_text(null=True), f"a string of printable characters (at most {MAX_SHORT_TEXT}) or null"),
    "rank": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "alpha": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a finite number"),
    "target_modules": (lambda v: _text()(v) or (isinstance(v, list) and len(v) <= 1024 and all(_text()(t) for t in v)),
                       "a string or a list of at most 1024 strings of printable characters"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "modules": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "num_params": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "dtype": (_text(), "a string of printable characters"),
    "created_at": (_text(), "a string of printable characters"),
    "creator": (_text(null=True), "a string of printable characters or null"),
    "message": (_text(MAX_MESSAGE, multiline=True), f"text of at most {MAX_MESSAGE} characters without control characters"),
    "training": (lambda v: v is None or (isinstance(v, dict) and _json_size(v) <= MAX_TRAINING_BYTES),
                 f"an object of at most {MAX_TRAINING_BYTES} bytes as JSON, or null"),
    "extra": (lambda v: isinstance(v, dict), "an object"),
}


_REQUIRED = ("name", "version", "files", "base_model", "base_fingerprint", "rank", "alpha", "target_modules",
             "use_rslora", "use_dora", "modules", "num_params", "dtype", "created_at", "creator", "message")


def _checked(data: object, name: str | None, version: int | None, limits: Limits) -> dict:
    """The validated keyword arguments of ``Manifest`` from parsed JSON; _Invalid with the reason."""
    _need(isinstance(data, dict), f"expected a JSON object, got {type(data).__name__}")
    data = dict(data)
    known = Manifest.__dataclass_fields__
    for k in _REQUIRED:
        _need(k in data, f"missing field {k!r}")
    n = data["name"]
    try:
        check_name(n)
    except InvalidNameError:
        raise _Invalid(f"name {_one_line(n)} is not a valid adapter name") from None
    _need(name is None or n == name, f"it names adapter {_one_line(n)} but is stored under {name!r}")
    v = data["version"]
    _need(_is_int(v) and v >= 1, f"version must be a positive integer, got {_one_line(v)}")
    _need(version is None or v == version, f"it names version {v} but is stored as version {version}")
    fmt = data.get("format_version", FORMAT_VERSION)
    _need(_is_int(fmt) and fmt >= 1, f"format_version must be a positive integer, got {_one_line(fmt)}")
    _need(fmt <= FORMAT_VERSION, f"format_version {fmt} is newer than this loraplex reads ({FORMAT_VERSION}): upgrade it")
    data["files"] = _check_files(data["files"], limits)
    stored_hash = data.pop("content_sha256", None)
    _need(stored_hash is None or stored_hash == content_hash(data["files"]),
          f"content_sha256 {_one_line(stored_hash)} does not match its files")
    _check_fingerprint(data.get("base_fingerprint"))
    extra = {k: data.pop(k) for k in list(data) if k not in known}
    _need(isinstance(data.get("extra", {}), dict), f"extra must be an object, got {_one_line(data.get('extra'))}")
    data["extra"] = {**data.get("extra", {}), **extra}
    for k, (ok, what) in _FIELD_TYPES.items():
        if k in data:
            _need(ok(data[k]), f"{k} must be {what}, got {_one_line(data[k])}")
    return data


def content_hash(files: dict[str, FileEntry]) -> str:
    """One hash for a version's bytes: identical adapters have identical content hashes."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{files[name].sha256}\n".encode())
    return h.hexdigest()


def hash_file(path: Path) -> FileEntry:
    h = hashlib.sha256()
    size = 0
    with Path(path).open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return FileEntry(h.hexdigest(), size)
