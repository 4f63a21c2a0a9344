"""The CLI's failure contract, asserted by the registry and trainer CLI tests."""

from __future__ import annotations

import subprocess

ERROR_PREFIX = "loraplex: error:"


def one_line_error(p: subprocess.CompletedProcess, rc: int | None = None, contains: str | None = None) -> str:
    """Assert the failure contract: non-zero exit, empty stdout, exactly one stderr line 'loraplex: error: ...'."""
    what = f"rc={p.returncode} stdout={p.stdout!r} stderr={p.stderr!r}"
    assert p.returncode != 0, what
    if rc is not None:
        assert p.returncode == rc, what
    assert p.stdout == "", what
    assert p.stderr.endswith("\n") and p.stderr.count("\n") == 1, what
    line = p.stderr.rstrip("\n")
    assert line.startswith(ERROR_PREFIX), what
    assert len(line) > len(ERROR_PREFIX) + 5, what
    assert "Traceback" not in line, what
    if contains is not None:
        assert contains.lower() in line.lower(), what
    return line
