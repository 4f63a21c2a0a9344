"""Storage backends for the registry, chosen by URI scheme.

A backend stores opaque bytes under ``/``-separated keys made only of validated names. It offers
a few primitives; everything else (versions, aliases, verification, caching) is written once in
the registry on top of them. ``create`` is the one that matters for correctness: it writes a key
only if it does not exist yet, atomically, so two writers can never both win; since a store may
silently ignore the condition (an S3 clone without ``If-None-Match``), ``check_exclusive_create``
probes it before the registry's first write. ``read`` and ``download`` take a byte ``limit``: an
object larger than it is refused (IntegrityError) after reading at most ``limit + 1`` bytes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import parse_qs, urlparse

from .errors import ConditionalWriteError, ConfigError, IntegrityError

Progress = Callable[[int], None]  # called with the number of bytes just transferred
# (label, total bytes) -> a context whose value is the Progress callback; the CLI's draws a bar.
ProgressFactory = Callable[[str, int], AbstractContextManager[Progress]]


class Storage(Protocol):
    uri: str

    def read(self, key: str, limit: int | None = None) -> bytes:
        """The object's bytes; NotFoundError if absent; IntegrityError if it is larger than limit."""

    def write(self, key: str, data: bytes) -> None:
        """Create or replace the object atomically."""

    def create(self, key: str, data: bytes) -> bool:
        """Write only if absent, atomically; False if the key already exists."""

    def upload(self, key: str, path: Path, progress: Progress | None = None) -> None:
        """Store a local file under key; readers never see a partial object."""

    def download(self, key: str, path: Path, progress: Progress | None = None, limit: int | None = None) -> None:
        """Write the object to a local path (the caller verifies it and renames it into place).

        IntegrityError if it is larger than limit: no more than limit + 1 bytes are read, limit written."""

    def list(self, prefix: str) -> list[str]:
        """Every key under prefix (which ends with ``/``), recursively."""

    def children(self, prefix: str) -> list[str]:
        """Names of the immediate sub-folders under prefix ("" for the root)."""

    def delete(self, key: str) -> None:
        """Remove the object; absent is fine."""


CHUNK = 1 << 20
PROBE_PREFIX = ".loraplex/probe-"  # never an adapter name (names start with a letter or digit)


def too_large(key: str, limit: int) -> IntegrityError:
    return IntegrityError(f"{key} is larger than {limit} bytes")


def copy_capped(read: Callable[[int], bytes], dst: BinaryIO, key: str, limit: int | None,
                progress: Progress | None = None, chunk: int = CHUNK) -> int:
    """Copy from ``read(n)`` into dst until EOF; past ``limit`` bytes raise (after reading at most one more byte)."""
    total = 0
    while True:
        want = chunk if limit is None else min(chunk, limit + 1 - total)
        data = read(want)
        if not data:
            return total
        total += len(data)
        if limit is not None and total > limit:
            raise too_large(key, limit)
        dst.write(data)
        if progress:
            progress(len(data))


def check_exclusive_create(storage: Storage) -> None:
    """Refuse a store whose ``create`` is not exclusive (ConditionalWriteError).

    Creates a fresh probe key twice: the second create must lose and leave the first's bytes. An S3
    clone that ignores ``If-None-Match: *`` lets the second one win, and would then let two pushers
    claim the same version number or two alias moves overwrite each other. The probe key is removed."""
    key = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    try:
        first = storage.create(key, b"first")
        second = storage.create(key, b"second")
        kept = storage.read(key, limit=16)
    except BaseException:
        try:  # best effort: the probe's own failure (store down, read-only, not a folder) is the one to report
            storage.delete(key)
        except Exception:
            pass
        raise
    storage.delete(key)
    if not first or second or kept != b"first":
        raise ConditionalWriteError(
            f"{storage.uri} does not honour exclusive creates (S3: conditional writes, If-None-Match: *): a second "
            f"create of probe key {key} {'succeeded' if second else 'misbehaved'}, so two pushes could share a "
            "version number; refusing to write to it (use AWS S3, SeaweedFS, MinIO or a local folder)"
        )


def open_storage(uri: str) -> Storage:
    """``file:///path``, a plain path, or ``s3://bucket/prefix?endpoint_url=..&region=..&profile=..``."""
    if not isinstance(uri, str) or not uri.strip():
        raise ConfigError("empty registry URI")
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        from .folder import FolderStorage

        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"registry URI {uri!r}: file URIs need an absolute path (file:///path)")
        path = parsed.path if parsed.scheme == "file" else uri
        return FolderStorage(Path(path).expanduser())
    if parsed.scheme == "s3":
        from .s3 import S3Storage

        opts = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        unknown = set(opts) - {"endpoint_url", "region", "profile"}
        if unknown:
            raise ConfigError(f"registry URI {uri!r}: unknown option(s) {', '.join(sorted(unknown))}")
        if not parsed.netloc:
            raise ConfigError(f"registry URI {uri!r}: missing bucket (s3://bucket/prefix)")
        return S3Storage(
            parsed.netloc, parsed.path.strip("/"),
            endpoint_url=opts.get("endpoint_url"), region=opts.get("region"), profile=opts.get("profile"),
        )
    raise ConfigError(f"registry URI {uri!r}: unsupported scheme {parsed.scheme!r} (use file:// or s3://)")
