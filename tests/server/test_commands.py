"""``loraplex serve``'s flags come from ``ServerSettings``: one flag per setting, with its type, choices and
help, none of them defaulting to anything (so LORAPLEX_* variables and the settings' defaults apply)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from loraplex.cli import build_parser
from loraplex.server import commands
from loraplex.server.api.settings import NOT_FLAGS, ServerSettings


def _serve_actions() -> dict[str, argparse.Action]:
    parser = build_parser(["serve"])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices["serve"]._actions}


def test_every_setting_has_its_flag():
    actions = _serve_actions()
    assert NOT_FLAGS <= set(ServerSettings.model_fields)
    for name, field in ServerSettings.model_fields.items():
        if name in ("api_key", "metrics_key"):  # secrets: environment only
            assert name not in actions
            continue
        assert field.description, f"{name} needs a description (it is the flag's help)"
        action = actions[name]
        flag = "--" + name.replace("_", "-")
        no = ["--no-" + name.replace("_", "-")] if field.annotation is bool else []  # --metrics-open, --no-metrics-open
        assert action.option_strings == [flag] + no
        assert action.default is None
        if name != "registry":  # the --registry every command takes
            assert field.description in action.help and f"LORAPLEX_{name.upper()}" in action.help
    assert actions["engine"].choices == ["native", "vllm"]
    assert actions["quantize"].choices == ["nf4", "int8", "none"]
    assert actions["max_loras"].type is int and actions["load_share"].type is float
    assert actions["kv_cache_gib"].type is float and actions["api_keys_file"].type is None


def test_flags_override_the_environment(monkeypatch, tmp_path):
    built = []

    class Server:
        def run(self) -> None:
            pass

    monkeypatch.setattr("loraplex.server.server.build_server", lambda settings: built.append(settings) or Server())
    monkeypatch.setenv("LORAPLEX_MAX_LORAS", "5")
    monkeypatch.setenv("LORAPLEX_MAX_RUNNING", "7")
    argv = ["serve", "--max-loras", "3", "--engine", "vllm", "--kv-cache-gib", "0.5", "--load-share", "0.2",
            "--api-keys-file", str(tmp_path / "keys.yaml"), "--registry", "file:///srv/reg", "--registry-ttl", "0",
            "--no-prefix-caching"]
    args = build_parser(argv).parse_args(argv)
    assert args.fn(args) == 0
    (s,) = built
    assert (s.max_loras, s.max_running, s.engine, s.kv_cache_gib, s.load_share, s.registry_ttl, s.prefix_caching) == \
        (3, 7, "vllm", 0.5, 0.2, 0.0, False)
    assert s.api_keys_file == tmp_path / "keys.yaml" and s.registry == "file:///srv/reg"
    assert s.port == 8000 and s.quantize is None  # not given: the default


def test_flag_types_follow_the_annotation():
    assert commands._flag_type(int) == {"type": int}
    assert commands._flag_type(float | None) == {"type": float}
    assert commands._flag_type(Literal["a", "b"] | None) == {"choices": ["a", "b"], "type": str}
    assert commands._flag_type(bool) == {"action": argparse.BooleanOptionalAction}
    assert commands._flag_type(Path | None) == {} and commands._flag_type(str) == {}


# ---- an open server only where nobody else can reach it ----------------------------------------------------
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from loraplex.server.server import check_exposure  # noqa: E402

EXPOSURE = [
    # host, open (no keys), --allow-open, refused
    ("127.0.0.1", True, False, False), ("localhost", True, False, False), ("::1", True, False, False),
    ("127.0.0.2", True, False, False), ("0.0.0.0", True, False, True), ("::", True, False, True),
    ("10.1.2.3", True, False, True), ("my-host.example", True, False, True), ("0.0.0.0", True, True, False),
    ("0.0.0.0", False, False, False),
]


@pytest.mark.parametrize("host, open_, allow, refused", EXPOSURE)
def test_an_open_server_is_refused_off_loopback(host, open_, allow, refused):
    from loraplex.adapters.errors import ConfigError

    if refused:
        with pytest.raises(ConfigError, match="--allow-open"):
            check_exposure(host, open_, allow)
    else:
        check_exposure(host, open_, allow)


def test_serve_on_every_interface_without_a_key_is_one_line(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LORAPLEX_HOME": str(tmp_path / "home")}
    p = subprocess.run([sys.executable, "-m", "loraplex", "serve", "--host", "0.0.0.0", "--port", "1"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stdout == "" and p.stderr.count("\n") == 1, p
    assert p.stderr.startswith("loraplex: error: refusing to serve without API keys on 0.0.0.0"), p.stderr
