"""Storage backends for the registry, chosen by URI scheme.

A backend stores opaque bytes under ``/``-separated keys made only of validated names. It offers
a few primitives; everything else (versions, aliases, verification, caching) is written once in
the registry on top of them. ``create`` is the one that matters for correctness: it writes a key
only if it does not exist yet, atomically, so two writers can never both win.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, urlparse

from .errors import ConfigError

Progress = Callable[[int], None]  # called with the number of bytes just transferred
# (label, total bytes) -> a context whose value is the Progress callback; the CLI's draws a bar.
ProgressFactory = Callable[[str, int], AbstractContextManager[Progress]]


class Storage(Protocol):
    uri: str

    def read(self, key: str) -> bytes:
        """The object's bytes; NotFoundError if absent."""

    def write(self, key: str, data: bytes) -> None:
        """Create or replace the object atomically."""

    def create(self, key: str, data: bytes) -> bool:
        """Write only if absent, atomically; False if the key already exists."""

    def upload(self, key: str, path: Path, progress: Progress | None = None) -> None:
        """Store a local file under key; readers never see a partial object."""

    def download(self, key: str, path: Path, progress: Progress | None = None) -> None:
        """Write the object to a local path (the caller renames it into place)."""

    def list(self, prefix: str) -> list[str]:
        """Every key under prefix (which ends with ``/``), recursively."""

    def children(self, prefix: str) -> list[str]:
        """Names of the immediate sub-folders under prefix ("" for the root)."""

    def delete(self, key: str) -> None:
        """Remove the object; absent is fine."""


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
