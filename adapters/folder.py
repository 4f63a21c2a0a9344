"""The local-folder storage backend (``file:///path``), the embedded default registry.

Atomicity comes from the filesystem: every write goes to a temporary file in the same folder and
is renamed into place (``os.replace``), and exclusive creation uses ``os.link``, which fails when the
target exists, so a key appears complete or not at all, and only one of two racing creators wins.
"""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path

from .errors import NotFoundError, StorageError
from .storage import Progress, copy_capped, too_large

TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20


class FolderStorage:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        p = self.root.joinpath(*key.split("/"))
        if ".." in key.split("/") or not p.is_relative_to(self.root):
            raise StorageError(f"refusing key {key!r} outside the registry")
        return p

    def _tmp(self, target: Path) -> Path:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot write to registry folder {self.root}: {exc.strerror}") from None
        return target.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}-{target.name}"

    def read(self, key: str, limit: int | None = None) -> bytes:
        try:
            with self._path(key).open("rb") as f:
                if limit is not None and os.fstat(f.fileno()).st_size > limit:
                    raise too_large(key, limit)
                out = io.BytesIO()
                copy_capped(f.read, out, key, limit)
                return out.getvalue()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFoundError(f"{key} not found in {self.uri}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {key} from {self.uri}: {exc.strerror}") from None

    def _open_tmp(self, target: Path):
        """A new temporary file beside ``target``, open for writing: (path, file). Retries when the folder
        vanishes between its mkdir and the open: a concurrent ``delete`` removes folders it leaves empty."""
        for attempt in range(8):
            tmp = self._tmp(target)
            try:
                return tmp, tmp.open("wb")
            except FileNotFoundError:
                if attempt == 7:
                    raise
        raise AssertionError("unreachable")

    def _write_tmp(self, target: Path, data: bytes) -> Path:
        tmp = None
        try:
            tmp, f = self._open_tmp(target)
            with f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot write {target.name} to {self.uri}: {exc.strerror}") from None
        return tmp

    def write(self, key: str, data: bytes) -> None:
        target = self._path(key)
        os.replace(self._write_tmp(target, data), target)

    def create(self, key: str, data: bytes) -> bool:
        target = self._path(key)
        tmp = self._write_tmp(target, data)
        try:
            os.link(tmp, target)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            raise StorageError(
                f"cannot create {key} in {self.uri}: {exc.strerror} (a registry folder needs a filesystem with hard links)"
            ) from None
        finally:
            tmp.unlink(missing_ok=True)

    def upload(self, key: str, path: Path, progress: Progress | None = None) -> None:
        target = self._path(key)
        tmp = None
        try:
            with Path(path).open("rb") as src:
                tmp, dst = self._open_tmp(target)
                with dst:
                    while chunk := src.read(_CHUNK):
                        dst.write(chunk)
                        if progress:
                            progress(len(chunk))
                    dst.flush()
                    os.fsync(dst.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            raise StorageError(f"cannot store {key} in {self.uri}: {exc.strerror}") from None
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    def download(self, key: str, path: Path, progress: Progress | None = None, limit: int | None = None) -> None:
        try:
            s = self._path(key).open("rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFoundError(f"{key} not found in {self.uri}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {key} from {self.uri}: {exc.strerror}") from None
        with s:
            if limit is not None and os.fstat(s.fileno()).st_size > limit:
                raise too_large(key, limit)  # refused before reading a byte
            with Path(path).open("wb") as d:
                copy_capped(s.read, d, key, limit, progress, _CHUNK)

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for f in files:
                if not f.startswith(TMP_PREFIX):
                    keys.append(f if rel == "." else f"{rel}/{f}")
        return sorted(keys)

    def children(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        try:
            return sorted(e.name for e in os.scandir(base) if e.is_dir() and not e.name.startswith("."))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageError(f"cannot read registry folder {base}: {exc.strerror}") from None

    def delete(self, key: str) -> None:
        target = self._path(key)
        try:
            target.unlink(missing_ok=True)
        except NotADirectoryError:
            return  # a parent is a file: the key cannot exist
        except OSError as exc:
            raise StorageError(f"cannot delete {key} from {self.uri}: {exc.strerror}") from None
        parent = target.parent
        while parent != self.root:
            try:
                parent.rmdir()  # only if empty; a writer whose folder vanishes before its open retries (_open_tmp)
            except OSError:
                break
            parent = parent.parent
