"""The local content-addressed adapter cache the server loads from.

Layout: ``ROOT/blobs/<sha256>`` holds each file once, whatever versions or names share it;
``ROOT/adapters/<content_sha256>/`` is a ready-to-load PEFT folder of hard links to those blobs.
Every blob is hashed while it is fetched and must match the manifest before it is renamed into
place; every folder is validated again before it is renamed into place. So a folder in the cache is
complete and verified, or absent.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

from .basemodel import BaseModelInfo
from .errors import IntegrityError, StorageError
from .manifest import Manifest
from .spec import ADAPTER_FILES, Limits, validate_adapter
from .storage import ProgressFactory, Storage

_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class AdapterCache:
    def __init__(self, root: str | Path, limits: Limits = Limits()) -> None:
        self.root = Path(root).expanduser().absolute()
        self.limits = limits

    @classmethod
    def default(cls, limits: Limits = Limits()) -> AdapterCache:
        return cls(Path.home() / ".loraplex" / "cache", limits)

    def folder_for(self, manifest: Manifest) -> Path:
        return self.root / "adapters" / manifest.content_sha256

    def materialize(self, storage: Storage, manifest: Manifest, progress: ProgressFactory | None = None) -> Path:
        final = self.folder_for(manifest)
        if all((final / f).is_file() for f in ADAPTER_FILES):
            return final
        try:
            (self.root / "blobs").mkdir(parents=True, exist_ok=True)
            (self.root / "adapters").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the adapter cache in {self.root}: {exc.strerror}") from None
        tmp = self.root / "adapters" / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for fname, entry in manifest.files.items():
                blob = self._blob(storage, f"{manifest.name}/v{manifest.version}/{fname}", entry.sha256, entry.size,
                                  progress, f"{manifest.ref} {fname}")
                os.link(blob, tmp / fname)
            base = BaseModelInfo.from_dict(manifest.base_fingerprint) if manifest.base_fingerprint else None
            validate_adapter(tmp, base, self.limits)
            try:
                os.rename(tmp, final)
            except OSError:  # another process materialized it first; theirs is as good as ours
                if not all((final / f).is_file() for f in ADAPTER_FILES):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _blob(self, storage: Storage, key: str, sha: str, size: int, progress: ProgressFactory | None, label: str) -> Path:
        blob = self.root / "blobs" / sha
        if blob.is_file() and blob.stat().st_size == size:
            return blob
        part = blob.with_name(f".tmp-{uuid.uuid4().hex}")
        try:
            if progress is None:
                storage.download(key, part)
            else:
                with progress(label, size) as update:
                    storage.download(key, part, update)
            got = _sha256(part)
            if got != sha:
                raise IntegrityError(f"{label} does not match its manifest (sha256 {got[:12]}, expected {sha[:12]}): the stored copy is corrupt")
            os.replace(part, blob)
        finally:
            part.unlink(missing_ok=True)
        return blob

    @staticmethod
    def export(folder: Path, dest: Path, manifest: Manifest | None = None) -> None:
        """Copy a cached adapter into dest (copies, so edits there never touch the cache)."""
        dest = dest.expanduser()
        try:
            dest.mkdir(parents=True, exist_ok=True)
            for fname in ADAPTER_FILES:
                part = dest / f".tmp-{uuid.uuid4().hex}-{fname}"
                shutil.copyfile(folder / fname, part)
                os.replace(part, dest / fname)
            if manifest is not None:
                (dest / "manifest.json").write_bytes(manifest.to_json())
        except OSError as exc:
            raise StorageError(f"cannot write the adapter into {dest}: {exc.strerror}") from None
