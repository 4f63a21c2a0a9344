"""Property-based fuzzing of the live server from its own OpenAPI schema: no request may get a 5xx."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server_fixtures import LiveServer
from test_server import settings, world  # noqa: F401  (the module fixture)


@pytest.mark.slow
def test_no_server_errors_under_fuzzing(world, tmp_path):  # noqa: F811
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPLEX_HOME", str(world["root"] / "home"))
        s = LiveServer(settings(world, max_tokens=8))
    try:
        st = Path(sys.executable).with_name("st")
        p = subprocess.run([str(st), "run", f"{s.url}/openapi.json", "--checks", "not_a_server_error",
                            "--max-examples", "25", "--request-timeout", "30", "--phases", "examples,fuzzing",
                            "--suppress-health-check", "all"],
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
        print(p.stdout[-1500:])
    finally:
        s.stop()
