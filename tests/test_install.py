"""The bare install: `pip install loraplex` (no extra) into a fresh venv gives the registry and its CLI without torch.

It builds the package from a copy of the source (so the checkout gets no build/ or egg-info), installs it from
PyPI's dependencies into a new venv, and then, as a user of that venv: pushes an adapter, lists it, and asks for
`loraplex serve`, which needs the `serve` extra and says so in one line. The installed distribution's
`top_level.txt` names only `loraplex`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from adapter_factory import write_adapter, write_base_config
from cli_checks import one_line_error

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "loraplex", "adapters", "server", "trainer")
HEAVY = ("torch", "transformers", "peft", "trl", "bitsandbytes", "fastapi", "vllm")

pytestmark = pytest.mark.slow


def _copy_sources(dest: Path) -> Path:
    dest.mkdir()
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def test_bare_install_pushes_an_adapter_without_torch(tmp_path):
    src = _copy_sources(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py, script = venv / "bin" / "python", venv / "bin" / "loraplex"
    started = time.monotonic()
    p = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(src)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    install_s = time.monotonic() - started

    probe = ("import importlib.util, importlib.metadata as md, json; "
             f"print(json.dumps({{'heavy': [m for m in {HEAVY!r} if importlib.util.find_spec(m)], "
             "'top_level': md.distribution('loraplex').read_text('top_level.txt').split()}))")
    facts = json.loads(subprocess.run([str(py), "-c", probe], capture_output=True, text=True, check=True).stdout)
    assert facts == {"heavy": [], "top_level": ["loraplex"]}

    registry = (tmp_path / "registry").as_uri()
    adapter = write_adapter(tmp_path / "adapter")
    base = write_base_config(tmp_path / "base")
    env = {"PATH": str(venv / "bin"), "HOME": str(tmp_path), "LORAPLEX_HOME": str(tmp_path / "home")}
    run = lambda *a: subprocess.run([str(script), *map(str, a), "--registry", registry], capture_output=True,  # noqa: E731
                                    text=True, env=env, cwd=tmp_path, timeout=120)
    pushed = run("push", adapter, "--name", "bare-bot", "--base-model", base, "--alias", "prod")
    assert pushed.returncode == 0 and pushed.stdout.startswith("pushed bare-bot@1"), pushed
    listed = json.loads(run("ls", "--json").stdout)
    assert [(a["name"], a["latest"]) for a in listed] == [("bare-bot", 1)], listed
    one_line_error(run("serve"), rc=1, contains="pip install 'loraplex[serve]'")
    one_line_error(run("train", "x.yaml"), rc=1, contains="pip install 'loraplex[train]'")
    # python -m loraplex is the same command
    shown = subprocess.run([str(py), "-m", "loraplex", "show", "bare-bot@prod", "--json", "--registry", registry],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert shown.returncode == 0 and json.loads(shown.stdout)["version"] == 1, shown
    print(f"bare install: {install_s:.1f} s")
