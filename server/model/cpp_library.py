"""A C++ op library built on first use with torch's extension loader, for this machine's CPU.

Each library is ATen's headers only and registers its ops with the dispatcher (``torch.ops.<name>.<op>``):
``torch/extension.h`` and a pybind module would triple the build (62 -> 20 s on 2 cores). It is compiled with
the machine's compiler (``-O3 -march=native``) and cached in ``TORCH_EXTENSIONS_DIR`` under a name that includes
the CPU's feature flags, so a build is never run on a CPU it was not built for. Without a compiler, or when an
environment switch turns it off, ``ops()`` is None and the caller keeps its plain-PyTorch path; ``why_not()``
says why, for the start-up log.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time

import torch

log = logging.getLogger("loraplex.engine")

STALE_LOCK_SECONDS = 600  # a build takes ~20 s on 2 cores: a lock this old was left by a killed process


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        line = ""
    return set(line.partition(":")[2].split())


def _cpu_tag() -> str:
    """The CPU's feature flags, hashed (a build with -march=native runs only where they are all present)."""
    return hashlib.blake2b(" ".join(sorted(cpu_flags())).encode(), digest_size=6).hexdigest()


def clear_stale_lock(name: str) -> bool:
    """Remove the build lock a process killed mid-build left behind (torch's loader waits on it forever);
    whether one was removed."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = os.path.join(_get_build_directory(name, verbose=False), "lock")
    try:
        if time.time() - os.path.getmtime(lock) > STALE_LOCK_SECONDS:
            os.remove(lock)
            log.warning("removed a stale build lock left by a killed build: %s", lock)
            return True
    except OSError:  # no lock (the usual case), or another process removed it first
        pass
    return False


class CppLibrary:
    """``source`` registers its ops with ``TORCH_LIBRARY(LIBRARY, m)``; the name is filled in at build time."""

    def __init__(self, prefix: str, source: str, switch: str, needs: frozenset[str] = frozenset()) -> None:
        self.prefix = prefix
        self.source = source
        self.switch = switch  # environment variable: "0" turns the library off
        self.needs = needs  # CPU flags the source requires (e.g. avx2, fma)
        self._lock = threading.Lock()
        self._ops = None
        self._failed: str | None = None

    def ops(self):
        """The op namespace, built on the first call (None when it cannot be)."""
        if self._ops is not None:  # the hot path: every layer asks
            return self._ops
        with self._lock:
            if self._ops is not None or self._failed is not None:
                return self._ops
            if os.environ.get(self.switch, "1") == "0":
                self._failed = f"turned off ({self.switch}=0)"
                return None
            missing = sorted(self.needs - cpu_flags())
            if missing:
                self._failed = f"this CPU lacks {', '.join(missing)}"
                return None
            try:
                from torch.utils.cpp_extension import load_inline

                name = f"{self.prefix}_{_cpu_tag()}"
                clear_stale_lock(name)
                load_inline(name=name, cpp_sources=[self.source.replace("TORCH_LIBRARY(LIBRARY", f"TORCH_LIBRARY({name}")],
                            extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                            is_python_module=False, no_implicit_headers=True, verbose=False)
                self._ops = getattr(torch.ops, name)
            except Exception as exc:  # no compiler, no ninja, a build error: the caller's plain path serves
                text = str(exc).strip()
                self._failed = f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"
                log.warning("C++ kernels %s unavailable (%s)", self.prefix, self._failed)
            return self._ops

    def why_not(self) -> str | None:
        return self._failed
