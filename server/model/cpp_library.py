"""loraplex's C++ kernels, built as one op library on first use with torch's extension loader, for this CPU.

Each kernel module (``PARTS``) holds its C++ as ``SOURCE`` and registers its ops with
``TORCH_LIBRARY_FRAGMENT(LIBRARY, m)``. The parts are compiled together as one translation unit (each in a
namespace of its own), so ATen's headers are parsed once: five separate builds took 74 s on 2 cores, one takes
~20 s. Only ATen's headers and dispatcher ops (``torch.ops.<name>.<op>``): ``torch/extension.h`` and a pybind
module would triple a build. It is compiled with the machine's compiler (``-O3 -march=native``) and cached in
``TORCH_EXTENSIONS_DIR`` under a name that includes the CPU's feature flags (a build with -march=native runs only
where they are all present) and the parts built. A part is left out where its switch (an environment variable
set to 0) turns it off or the CPU lacks a feature its source needs; without a compiler nothing is built. Then
``ops(part)`` is None, the caller keeps its plain-PyTorch path, and ``why_not(part)`` says why, for the log.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import re
import threading
import time
from dataclasses import dataclass

import torch

log = logging.getLogger("loraplex.engine")

STALE_LOCK_SECONDS = 600  # a build takes ~20 s on 2 cores: a lock this old was left by a killed process


@dataclass(frozen=True)
class Part:
    name: str
    module: str  # the module whose SOURCE it is
    switch: str  # environment variable: "0" leaves the part out
    needs: frozenset[str] = frozenset()  # CPU flags its source requires
    uses: tuple[str, ...] = ()  # parts whose functions its source calls (they come before it in PARTS)


PARTS = (
    Part("paged_attention", "loraplex.server.model.paged_attention", "LORAPLEX_PAGED_ATTENTION"),
    Part("nf4", "loraplex.server.model.nf4", "LORAPLEX_NF4_KERNEL", frozenset({"avx2", "fma"})),
    Part("compact", "loraplex.server.model.compact", "LORAPLEX_COMPACT_KERNEL", frozenset({"avx2", "fma"})),
    Part("fused", "loraplex.server.model.fused", "LORAPLEX_FUSED_OPS"),
    Part("lora_delta", "loraplex.server.lora.delta", "LORAPLEX_LORA_KERNEL"),
    Part("stack", "loraplex.server.model.stack", "LORAPLEX_STACK_OP", frozenset({"avx2", "fma"}),
         ("nf4", "fused", "paged_attention", "lora_delta")),
)


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        line = ""
    return set(line.partition(":")[2].split())


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


def translation_unit(sources: dict[str, str]) -> str:
    """The parts' sources as one C++ file: each part's code after its #includes goes in a namespace of its own."""
    out = []
    for name, src in sources.items():
        lines = src.strip("\n").splitlines()
        last = max((i for i, line in enumerate(lines) if line.startswith("#include")), default=-1)
        out += lines[:last + 1] + [f"namespace loraplex_{name} {{"] + lines[last + 1:] + [f"}}  // namespace loraplex_{name}", ""]
    return "\n".join(out)


class CppLibrary:
    def __init__(self, prefix: str, parts: tuple[Part, ...]) -> None:
        self.prefix = prefix
        self.parts = {p.name: p for p in parts}
        self._lock = threading.Lock()
        self._ops = None
        self._built = False
        self._why: dict[str, str] = {}  # part -> why it is not in the library

    def ops(self, part: str):
        """The op namespace if ``part`` is in the library (built on the first call), else None."""
        if not self._built:
            with self._lock:
                if not self._built:
                    self._build()
                    self._built = True
        return self._ops if part not in self._why else None

    def why_not(self, part: str) -> str | None:
        self.ops(part)
        return self._why.get(part)

    def _build(self) -> None:
        flags = cpu_flags()
        sources = {}
        for p in self.parts.values():
            missing = sorted(p.needs - flags)
            if os.environ.get(p.switch, "1") == "0":
                self._why[p.name] = f"turned off ({p.switch}=0)"
            elif missing:
                self._why[p.name] = f"this CPU lacks {', '.join(missing)}"
            else:
                try:
                    sources[p.name] = importlib.import_module(p.module).SOURCE
                except (ImportError, AttributeError) as exc:
                    self._why[p.name] = f"{type(exc).__name__}: {exc}"
            absent = [u for u in p.uses if u not in sources]
            if p.name in sources and absent:
                del sources[p.name]
                self._why[p.name] = f"needs the {', '.join(absent)} part(s): {self._why[absent[0]]}"
        if not sources:
            return
        tag = hashlib.blake2b((" ".join(sorted(flags)) + "|" + " ".join(sources)).encode(), digest_size=6).hexdigest()
        name = f"{self.prefix}_{tag}"
        try:
            from torch.utils.cpp_extension import load_inline

            clear_stale_lock(name)
            source = re.sub(r"TORCH_LIBRARY_FRAGMENT\(LIBRARY", f"TORCH_LIBRARY_FRAGMENT({name}", translation_unit(sources))
            load_inline(name=name, cpp_sources=[source], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                        extra_ldflags=["-fopenmp"], is_python_module=False, no_implicit_headers=True, verbose=False)
            self._ops = getattr(torch.ops, name)
        except Exception as exc:  # no compiler, no ninja, a build error: every caller's plain path serves
            text = str(exc).strip()
            why = f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"
            for p in sources:
                self._why[p] = why
            log.warning("C++ kernels unavailable (%s): PyTorch ops serve instead", why)


KERNELS = CppLibrary("loraplex_kernels", PARTS)


class _Scratch(threading.local):
    buf = torch.empty(0)


_scratch = _Scratch()  # per thread: an engine's steps run on one thread, tests may run several engines


def scratch(n: int) -> torch.Tensor:
    """A reused float32 buffer of at least ``n`` values (weights decoded for one matmul; a fresh allocation of
    that size each layer faulted its pages in every time)."""
    if _scratch.buf.numel() < n:
        _scratch.buf = torch.empty(n)
    return _scratch.buf


def ops(part: str):
    return KERNELS.ops(part)


def why_not(part: str) -> str | None:
    return KERNELS.why_not(part)
