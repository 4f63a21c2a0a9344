"""The local content-addressed adapter cache the server loads from.

Layout: ``ROOT/blobs/<sha256>`` holds each file once, whatever versions or names share it;
``ROOT/adapters/<content_sha256>/`` is a ready-to-load PEFT folder of hard links to those blobs.

Filling it: every download is capped at the size the manifest gives (itself within ``spec.Limits``,
see ``manifest.py``) and stops reading one byte past it; it goes to a temporary file inside the cache
and is renamed into place only once its sha256 and size match the manifest; the folder is validated
again before it is renamed into place. So a folder in the cache is complete and verified, or absent,
and a manifest can never make the cache write outside ``ROOT`` (its file names and sha256 strings,
which become paths here, are checked on every read and again here).

Using it: a cached entry is not trusted forever. Each ``materialize`` checks every file of the folder
is a regular file of the manifest's size (two ``lstat`` calls: the warm path stays cheap), and hashes it
(sha256) the first time this cache object sees it and again whenever its inode, size, mtime or ctime
changed since the last hash; a blob is checked the same way before it is reused. A folder that fails
(a truncated, corrupted, replaced or deleted file) is moved aside and rebuilt: from its blobs if they
are intact, else downloaded again from the store. The one change this misses is an in-place rewrite of
the same size that restores both mtime and ctime (ctime can only be reset by changing the clock), made
after this process hashed the file; a new process (a server restart) hashes every file again.
"""

from __future__ import annotations

import os
import shutil
import stat
import threading
import uuid
from pathlib import Path

from .basemodel import BaseModelInfo
from .errors import IntegrityError, StorageError
from .manifest import SHA256_RE, Manifest, file_limits, hash_file
from .spec import ADAPTER_FILES, Limits, validate_adapter
from .storage import ProgressFactory, Storage



def _check_paths(manifest: Manifest) -> None:
    """Defense in depth for manifests built in code: names and hashes become paths below."""
    if set(manifest.files) != set(ADAPTER_FILES) or not all(SHA256_RE.fullmatch(e.sha256) for e in manifest.files.values()):
        raise IntegrityError(f"manifest {manifest.ref} is invalid: its files must be exactly "
                             f"{', '.join(ADAPTER_FILES)} with 64-hex sha256 strings")


class AdapterCache:
    def __init__(self, root: str | Path, limits: Limits = Limits()) -> None:
        self.root = Path(root).expanduser().absolute()
        self.limits = limits
        # (st_dev, st_ino) -> (sha256, (size, mtime_ns, ctime_ns)) when this object last hashed that file.
        # Folder files and blobs are hard links of one inode, so one entry covers both.
        self._hashed: dict[tuple[int, int], tuple[str, tuple[int, int, int]]] = {}
        self._lock = threading.Lock()
        self.hashes = 0  # files hashed to verify cache entries (not downloads): the warm path adds none

    @classmethod
    def default(cls, limits: Limits = Limits()) -> AdapterCache:
        return cls(Path.home() / ".loraplex" / "cache", limits)

    def holds_adapters(self) -> bool:
        """Whether any adapter version is cached here (what a replica can serve while the registry is down)."""
        try:
            return any((self.root / "adapters").iterdir())
        except OSError:
            return False

    def folder_for(self, manifest: Manifest) -> Path:
        return self.root / "adapters" / manifest.content_sha256

    # ---- verification ------------------------------------------------------------------------
    def _matches(self, path: Path, sha: str, size: int) -> bool:
        """path is a regular file with this size and sha256 (hashed only when its stat changed)."""
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return False
        ident, sig = (st.st_dev, st.st_ino), (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with self._lock:
            if self._hashed.get(ident) == (sha, sig):
                return True
        try:
            got = hash_file(path).sha256
        except (FileNotFoundError, NotADirectoryError):
            return False
        self.hashes += 1
        if got != sha:
            return False
        with self._lock:
            self._hashed[ident] = (sha, sig)
        return True

    def _intact(self, folder: Path, manifest: Manifest) -> bool:
        try:
            if not stat.S_ISDIR(os.lstat(folder).st_mode):
                return False
        except FileNotFoundError:
            return False
        return all(self._matches(folder / f, e.sha256, e.size) for f, e in manifest.files.items())

    def _remember(self, folder: Path, manifest: Manifest) -> None:
        """Record the files of a folder this process just built from verified blobs (linking changed their ctime)."""
        for fname, entry in manifest.files.items():
            st = os.lstat(folder / fname)
            with self._lock:
                self._hashed[(st.st_dev, st.st_ino)] = (entry.sha256, (st.st_size, st.st_mtime_ns, st.st_ctime_ns))

    def _discard(self, path: Path) -> None:
        """Move a bad entry aside (one rename, so no reader sees it half-removed) and delete it."""
        trash = path.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return  # another process healed it first
        except OSError as exc:
            raise StorageError(f"cannot replace the damaged cache entry {path}: {exc.strerror}") from None
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)

    # ---- filling -----------------------------------------------------------------------------
    def materialize(self, storage: Storage, manifest: Manifest, progress: ProgressFactory | None = None) -> Path:
        """A verified local folder for the manifest: the cached one if intact, else rebuilt (healed)."""
        _check_paths(manifest)
        final = self.folder_for(manifest)
        if self._intact(final, manifest):
            return final
        if os.path.lexists(final):  # damaged: truncated, corrupted, tampered with, or half-deleted
            self._discard(final)
        try:
            (self.root / "blobs").mkdir(parents=True, exist_ok=True)
            (self.root / "adapters").mkdir(parents=True, exist_ok=True)
            tmp = self.root / "adapters" / f".tmp-{uuid.uuid4().hex}"
            tmp.mkdir()
        except OSError as exc:
            raise StorageError(f"cannot create the adapter cache in {self.root}: {exc.strerror}") from None
        try:
            caps = file_limits(self.limits)
            for fname in ADAPTER_FILES:
                entry = manifest.files[fname]
                blob = self._blob(storage, f"{manifest.name}/v{manifest.version}/{fname}", entry.sha256,
                                  min(entry.size, caps[fname]), entry.size, progress, f"{manifest.ref} {fname}")
                os.link(blob, tmp / fname)
            base = BaseModelInfo.from_dict(manifest.base_fingerprint) if manifest.base_fingerprint else None
            validate_adapter(tmp, base, self.limits)
            for attempt in range(2):
                try:
                    os.rename(tmp, final)
                    self._remember(final, manifest)
                    break
                except OSError:  # another process materialized it first; theirs is as good as ours if intact
                    if self._intact(final, manifest):
                        break
                    if attempt:
                        raise
                    self._discard(final)
        except OSError as exc:
            raise StorageError(f"cannot write {manifest.ref} into the adapter cache {self.root}: {exc.strerror}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _blob(self, storage: Storage, key: str, sha: str, cap: int, size: int, progress: ProgressFactory | None,
              label: str) -> Path:
        blob = self.root / "blobs" / sha
        if self._matches(blob, sha, size):
            return blob
        if os.path.lexists(blob):
            self._discard(blob)
        part = blob.with_name(f".tmp-{uuid.uuid4().hex}")
        try:
            try:
                if progress is None:
                    storage.download(key, part, limit=cap)
                else:
                    with progress(label, size) as update:
                        storage.download(key, part, update, limit=cap)
            except IntegrityError:
                raise IntegrityError(f"{label} is larger than its manifest says ({size} bytes): the stored copy is "
                                     "corrupt or was tampered with; refused without reading past that size") from None
            entry = hash_file(part)
            got, got_size = entry.sha256, entry.size
            if got != sha or got_size != size:
                raise IntegrityError(f"{label} does not match its manifest (sha256 {got[:12]}, {got_size} bytes; expected "
                                     f"{sha[:12]}, {size} bytes): the stored copy is corrupt")
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

