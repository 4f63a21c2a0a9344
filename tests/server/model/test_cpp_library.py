"""The C++ kernels' build: a lock left by a killed build is cleared (a fresh one is kept); a part whose source
needs CPU features this machine lacks, or that its switch turns off, is left out and says why; a source that does
not compile leaves every part on its plain path; the parts share one library, each in its own C++ namespace."""

from __future__ import annotations

import sys
import types

import pytest

from loraplex.server.model import cpp_library
from loraplex.server.model.cpp_library import CppLibrary, Part


def test_a_lock_left_by_a_killed_build_is_cleared_and_a_fresh_one_kept(tmp_path, monkeypatch):
    import os
    import time

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "some_kernel" / "lock"
    lock.parent.mkdir()
    lock.write_text("")
    assert not cpp_library.clear_stale_lock("some_kernel") and lock.exists()  # a build under way
    old = time.time() - cpp_library.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    assert cpp_library.clear_stale_lock("some_kernel") and not lock.exists()
    assert not cpp_library.clear_stale_lock("some_kernel")  # nothing left


def fake_part(monkeypatch, name: str, source: str, **kw) -> Part:
    module = types.ModuleType(f"fake_kernel_{name}")
    module.SOURCE = source
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return Part(name, module.__name__, f"LORAPLEX_TEST_{name.upper()}", **kw)


def test_a_part_needing_a_missing_cpu_feature_or_turned_off_is_left_out(monkeypatch):
    monkeypatch.setenv("LORAPLEX_TEST_OFF", "0")
    lib = CppLibrary("loraplex_never_built", (fake_part(monkeypatch, "wide", "x", needs=frozenset({"no_such_flag"})),
                                              fake_part(monkeypatch, "off", "x")))
    assert lib.ops("wide") is None and lib.why_not("wide") == "this CPU lacks no_such_flag"
    assert lib.ops("off") is None and lib.why_not("off") == "turned off (LORAPLEX_TEST_OFF=0)"


def test_a_source_that_does_not_compile_leaves_every_part_on_the_plain_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lib = CppLibrary("loraplex_broken", (fake_part(monkeypatch, "broken", "#include <torch/library.h>\nnot C++;\n"),
                                         fake_part(monkeypatch, "fine", "#include <torch/library.h>\n")))
    assert lib.ops("fine") is None and lib.why_not("broken") and lib.why_not("fine") == lib.why_not("broken")


def test_the_parts_share_one_library_and_each_keeps_its_namespace():
    from loraplex.server.model import compact, fused, nf4, paged_attention
    from loraplex.server.lora import delta

    built = [cpp_library.ops(p.name) for p in cpp_library.PARTS if cpp_library.ops(p.name) is not None]
    if not built:
        pytest.skip(f"no C++ toolchain here: {cpp_library.why_not('fused')}")
    assert all(b is built[0] for b in built)
    unit = cpp_library.translation_unit({"a": "#include <x>\nstatic int f();", "b": "#include <y>\nstatic int f();"})
    assert "namespace loraplex_a {\nstatic int f();\n}" in unit and unit.index("#include <y>") > unit.index("loraplex_a")
    del compact, fused, nf4, paged_attention, delta
