"""The manifest of one adapter version: what its files are, what it was made for and by whom.

Stored as ``NAME/vN/manifest.json``; writing it (exclusively) is what makes a version visible.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import IntegrityError

FORMAT_VERSION = 1
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
    def from_json(cls, raw: bytes, where: str) -> Manifest:
        try:
            data = json.loads(raw)
            data.pop("content_sha256", None)
            data["files"] = {k: FileEntry(**v) for k, v in data["files"].items()}
            known = cls.__dataclass_fields__
            extra = {k: data.pop(k) for k in list(data) if k not in known}
            data.setdefault("extra", {}).update(extra)
            return cls(**data)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IntegrityError(f"manifest {where} is unreadable: {exc}") from None


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
