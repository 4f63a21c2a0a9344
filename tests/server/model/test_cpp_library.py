"""The C++ op libraries' build: a lock left by a killed build is cleared (a fresh one is kept); a library whose
source needs CPU features this machine lacks, or that its switch turns off, is not built and says why."""

from __future__ import annotations

from loraplex.server.model import cpp_library
from loraplex.server.model.cpp_library import CppLibrary


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


def test_a_library_needing_a_missing_cpu_feature_is_not_built_and_says_why():
    lib = CppLibrary("loraplex_never_built", "this is not C++", "LORAPLEX_TEST_UNUSED", needs=frozenset({"no_such_flag"}))
    assert lib.ops() is None and lib.why_not() == "this CPU lacks no_such_flag"


def test_a_library_turned_off_by_its_switch_is_not_built(monkeypatch):
    monkeypatch.setenv("LORAPLEX_TEST_SWITCH", "0")
    lib = CppLibrary("loraplex_never_built", "this is not C++", "LORAPLEX_TEST_SWITCH")
    assert lib.ops() is None and lib.why_not() == "turned off (LORAPLEX_TEST_SWITCH=0)"


def test_a_source_that_does_not_compile_leaves_the_plain_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lib = CppLibrary("loraplex_broken", "#include <torch/library.h>\nthis is not C++;\n", "LORAPLEX_TEST_UNUSED")
    assert lib.ops() is None and lib.why_not()
    assert lib.ops() is None  # not retried
