"""Derived adapters as PEFT folders on disk: what vLLM loads for mixtures and merges.

vLLM serves one adapter per request, from a folder. A weighted mixture or a merge is computed once with
``server.lora.merge`` (PEFT ``add_weighted_adapter`` math: ``cat`` for mixtures, exact) and written here
as a PEFT LoRA folder named after the hash of its inputs, so asking again reuses it. A folder is
written under a temporary name and renamed: present and complete, or absent.

The folders are a cache of this server's run: each ``DerivedStore`` writes into a folder of its own under
``root`` (``run-<pid>-<random>``), held with an ``flock`` on ``run-....lock`` for as long as the store lives.
A new store deletes the folders of runs whose lock nobody holds any more (a server that stopped or died), so
servers sharing ``root`` never delete each other's folders. How many folders a run keeps is the catalog's
bound (``AdapterCatalog(max_derived=...)``), which calls ``remove``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from loraplex.adapters.spec import CONFIG_FILE, WEIGHTS_FILE

from ..lora.weights import LoraWeights

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def peft_key(layer: int, proj: str, ab: str) -> str:
    part = "self_attn" if proj in _ATTN else "mlp"
    return f"base_model.model.model.layers.{layer}.{part}.{proj}.lora_{ab}.weight"


def write_peft(weights: LoraWeights, folder: Path, base_model: str | None = None) -> Path:
    """Save ``weights`` as a PEFT LoRA folder with one rank ``R`` (the largest module rank) and scale 1.

    Each module's scale is folded into its A, and modules of smaller rank are zero-padded to ``R`` (as
    PEFT pads a ``cat`` merge): zero rows and columns add nothing, so every module's delta is unchanged.
    """
    big_r = weights.rank
    tensors: dict[str, torch.Tensor] = {}
    for key, m in weights.modules.items():
        r = m.rank
        a = torch.zeros(big_r, m.a.shape[1], dtype=torch.float32)  # [R, in]
        b = torch.zeros(m.b.shape[0], big_r, dtype=torch.float32)  # [out, R]
        a[:r] = m.a.float() * m.scale
        b[:, :r] = m.b.float()
        tensors[peft_key(key.layer, key.proj, "A")] = a.contiguous()
        tensors[peft_key(key.layer, key.proj, "B")] = b.contiguous()
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": big_r, "lora_alpha": big_r, "use_rslora": False,
              "use_dora": False, "lora_dropout": 0.0, "bias": "none",
              "target_modules": sorted({k.proj for k in weights.modules}), "base_model_name_or_path": base_model}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    return folder


class DerivedStore:
    """Derived adapter folders, one per name (``mix-<hash>`` / ``merge-<hash>``), in this run's folder of ``root``."""

    def __init__(self, root: Path, base_model: str | None = None) -> None:
        self.root = Path(root)
        self.base_model = base_model
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)
        with _flocked(self.root / ".lock"):  # one store at a time sets up: none deletes a run being set up
            _remove_stale(self.root)
            run = f"run-{os.getpid()}-{secrets.token_hex(4)}"
            self._lock_file = open(self.root / f"{run}.lock", "w")  # noqa: SIM115  held for the store's life
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.dir = self.root / run
            self.dir.mkdir()

    def folder(self, name: str, build: Callable[[], LoraWeights]) -> Path:
        """The folder of ``name``, built with ``build()`` the first time (once, even when asked concurrently)."""
        target = self.dir / name
        if (target / CONFIG_FILE).is_file():
            return target
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            if (target / CONFIG_FILE).is_file():
                return target
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.dir))
            try:
                write_peft(build(), tmp, self.base_model)
                tmp.chmod(0o755)
                try:
                    os.replace(tmp, target)
                except OSError:  # made meanwhile
                    if not (target / CONFIG_FILE).is_file():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return target

    def exists(self, name: str) -> bool:
        return (self.dir / name / CONFIG_FILE).is_file()

    def remove(self, name: str) -> None:
        """Delete the folder of ``name`` (vLLM keeps what it loaded from it in memory)."""
        with self._guard:
            self._locks.pop(name, None)
        shutil.rmtree(self.dir / name, ignore_errors=True)

    def names(self) -> list[str]:
        """The derived folders on disk in this run's folder."""
        return sorted(p.name for p in self.dir.iterdir() if not p.name.startswith(".")) if self.dir.is_dir() else []

    def close(self) -> None:
        """Delete this run's folders and let go of its lock."""
        shutil.rmtree(self.dir, ignore_errors=True)
        if not self._lock_file.closed:
            (self.root / f"{self.dir.name}.lock").unlink(missing_ok=True)
            self._lock_file.close()


@contextlib.contextmanager
def _flocked(path: Path):
    with open(path, "a") as f:  # closing releases the lock
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _remove_stale(root: Path) -> None:
    """Delete what runs that ended left under ``root``: run folders whose lock is free, and the folders of
    older versions (``mix-*``, ``merge-*`` straight under ``root``)."""
    for lock in root.glob("run-*.lock"):
        with open(lock, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # a live store holds it
                continue
            shutil.rmtree(root / lock.name[:-len(".lock")], ignore_errors=True)
            lock.unlink(missing_ok=True)
    for run in root.glob("run-*"):
        if run.is_dir() and not (root / f"{run.name}.lock").exists():
            shutil.rmtree(run, ignore_errors=True)
    for old in [*root.glob("mix-*"), *root.glob("merge-*"), *root.glob(".mix-*"), *root.glob(".merge-*")]:
        shutil.rmtree(old, ignore_errors=True)
