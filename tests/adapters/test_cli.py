"""The ``loraplex`` command end to end: real subprocesses against a folder registry and a real S3 bucket.

Every test runs the CLI as a user would (``python -m loraplex`` or the ``loraplex`` script) with
``LORAPLEX_HOME`` and ``HOME`` pointed at temporary folders, so nothing touches ``~/.loraplex``.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ports import free_port

from adapter_factory import TINY_BASE_CONFIG, write_adapter, write_base_config
from cli_checks import ERROR_PREFIX, one_line_error

from loraplex.adapters.basemodel import BaseModelInfo
from loraplex.adapters.registry import default_creator

LORAPLEX_SCRIPT = Path(sys.executable).parent / "loraplex"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

# A bigger fake base: r=64 on it gives an adapter of about 9 MB (above the 4 MB progress threshold).
BIG_BASE_CONFIG = {
    **TINY_BASE_CONFIG, "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 8, "_name_or_path": "big-llama",
}


# ---- helpers ---------------------------------------------------------------------------------
class Cli:
    """Runs ``python -m loraplex`` with a controlled environment and, by default, ``--registry``."""

    def __init__(self, registry: str | None, env: dict[str, str], cwd: Path) -> None:
        self.registry = registry
        self.env = env
        self.cwd = cwd

    def __call__(self, *args: str | Path, registry: str | None | bool = True, env: dict | None = None,
                 script: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
        argv = [str(a) for a in args]
        reg = self.registry if registry is True else (registry or None)
        if reg is not None:
            argv += ["--registry", reg]
        cmd = [str(LORAPLEX_SCRIPT)] if script else [sys.executable, "-m", "loraplex"]
        return subprocess.run(cmd + argv, env={**self.env, **(env or {})}, cwd=self.cwd, capture_output=True,
                              text=True, timeout=timeout)

    def ok(self, *args, **kw) -> str:
        p = self(*args, **kw)
        assert p.returncode == 0, f"loraplex {' '.join(map(str, args))} failed ({p.returncode}): {p.stderr}"
        assert "Traceback" not in p.stderr
        return p.stdout

    def json(self, *args, **kw):
        return json.loads(self.ok(*args, "--json", **kw))


def file_entries(folder: Path) -> dict[str, dict]:
    return {f: {"sha256": hashlib.sha256((folder / f).read_bytes()).hexdigest(), "size": (folder / f).stat().st_size}
            for f in ADAPTER_FILES}


def base_env(tmp_path: Path) -> dict[str, str]:
    """The parent's environment without any LORAPLEX_* / AWS_* setting, homes in tmp_path, no progress bars."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAPLEX_", "AWS_"))}
    (tmp_path / "userhome").mkdir(exist_ok=True)
    env.update(LORAPLEX_HOME=str(tmp_path / "lphome"), LORAPLEX_PROGRESS="0", HOME=str(tmp_path / "userhome"),
               PYTHONDONTWRITEBYTECODE="1")
    return env




@pytest.fixture
def cli(registry_uri, backend, tmp_path, request) -> Cli:
    env = base_env(tmp_path)
    if backend == "s3":
        env.update(request.getfixturevalue("seaweed").env())
    work = tmp_path / "cwd"
    work.mkdir()
    return Cli(registry_uri, env, work)


@pytest.fixture
def folder_cli(tmp_path) -> Cli:
    work = tmp_path / "cwd"
    work.mkdir(exist_ok=True)
    return Cli((tmp_path / "registry").as_uri(), base_env(tmp_path), work)


# ---- the whole lifecycle -----------------------------------------------------------------------
@pytest.mark.slow
def test_lifecycle(cli, make_adapter, base_dir, tmp_path):
    a = make_adapter(seed=0)
    b = make_adapter(seed=1)
    c = make_adapter(seed=2, r=8)
    base = BaseModelInfo.from_hf_config("tiny-llama", TINY_BASE_CONFIG)
    creator = default_creator()

    # push, with base model, message and alias
    out = cli.ok("push", a, "--name", "foo", "--base-model", base_dir, "--message", "first cut", "--alias", "candidate")
    assert out.startswith("pushed foo@1 (") and "r=4" in out and "14 modules" in out
    assert out.rstrip().endswith("; candidate -> 1")
    assert f"to {cli.registry.split('?')[0]};" in out

    # identical content again: nothing pushed, exit 0
    p = cli("push", a, "--name", "foo", "--base-model", base_dir)
    assert p.returncode == 0 and p.stderr == ""
    assert "identical to foo@1; nothing pushed" in p.stdout
    again = cli.json("push", a, "--name", "foo", "--base-model", base_dir)
    assert again["created"] is False and again["version"] == 1

    # --force adds v2 with the same bytes; new content gives v3
    assert cli.ok("push", a, "--name", "foo", "--base-model", base_dir, "--force").startswith("pushed foo@2 ")
    v3 = cli.json("push", b, "--name", "foo", "--base-model", base_dir, "-m", "second")
    assert v3["created"] is True and v3["version"] == 3 and v3["ref"] == "foo@3"
    cli.ok("push", c, "--name", "bar", "--base-model", base_dir)

    # ls: names
    out = cli.ok("ls")
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "LATEST", "ALIASES", "BASE", "UPDATED"]
    assert [ln.split()[:4] for ln in lines[1:]] == [["bar", "1", "-", "tiny-llama"], ["foo", "3", "candidate", "tiny-llama"]]
    listing = cli.json("ls")
    assert [d["name"] for d in listing] == ["bar", "foo"]
    assert listing[1]["latest"] == 3 and listing[1]["aliases"] == {"latest": 3, "candidate": 1}

    # ls NAME: versions with their aliases, latest included
    out = cli.ok("ls", "foo")
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines()}
    assert rows["VERSION"][:4] == ["VERSION", "ALIASES", "SIZE", "RANK"]
    assert rows["1"][1] == "candidate" and rows["2"][1] == "-" and rows["3"][1] == "latest"
    assert out.splitlines()[1].endswith("first cut")
    versions = cli.json("ls", "foo")
    assert [(v["version"], v["aliases"]) for v in versions] == [(1, ["candidate"]), (2, []), (3, ["latest"])]

    # show by version, alias and latest
    m1 = cli.json("show", "foo@1")
    assert m1["ref"] == "foo@1" and m1["name"] == "foo" and m1["version"] == 1
    assert m1["files"] == file_entries(a)
    assert m1["base_model"] == "tiny-llama"
    assert m1["base_fingerprint"]["fingerprint"] == base.fingerprint
    assert m1["base_fingerprint"]["hidden_size"] == 64
    assert m1["rank"] == 4 and m1["alpha"] == 8 and m1["modules"] == 14 and m1["dtype"] == "F32"
    assert m1["message"] == "first cut" and m1["creator"] == creator
    assert m1["aliases"] == ["candidate"]
    assert [(e["action"], e["previous"], e["version"]) for e in m1["alias_history"]["candidate"]] == [("push", None, 1)]
    assert cli.json("show", "foo@candidate") == m1
    latest = cli.json("show", "foo")
    assert latest["version"] == 3 and latest["files"] == file_entries(b) and latest["message"] == "second"
    assert latest["aliases"] == ["latest"] and latest["content_sha256"] != m1["content_sha256"]
    assert cli.json("show", "foo@latest") == latest
    assert cli.json("show", "foo@2")["files"] == m1["files"]
    text = cli.ok("show", "foo@1")
    assert text.startswith("foo@1  (candidate)")
    assert f"[{base.fingerprint}]" in text and "first cut" in text
    assert f"sha256:{m1['files']['adapter_model.safetensors']['sha256']}" in text

    # tag, then move and roll back
    assert cli.ok("tag", "foo@1", "prod").strip() == "foo@prod: - -> 1"
    assert cli.ok("tag", "foo@3", "prod").strip() == "foo@prod: 1 -> 3"
    assert cli.json("show", "foo@prod")["version"] == 3
    assert cli.ok("rollback", "foo", "prod").strip() == "foo@prod: rolled back 3 -> 1"
    shown = cli.json("show", "foo@prod")
    assert shown["version"] == 1 and shown["aliases"] == ["candidate", "prod"]
    assert [(e["action"], e["previous"], e["version"]) for e in shown["alias_history"]["prod"]] == [
        ("tag", None, 1), ("tag", 1, 3), ("rollback", 3, 1)]
    tagged = cli.json("tag", "foo@candidate", "staging")  # an alias may name its target by another alias
    assert tagged["version"] == 1 and tagged["action"] == "tag"

    # pull: byte-identical files plus manifest.json
    dest = tmp_path / "pulled"
    out = cli.ok("pull", "foo@prod", dest)
    assert out.startswith("pulled foo@1 into ")
    assert sorted(p.name for p in dest.iterdir()) == sorted([*ADAPTER_FILES, "manifest.json"])
    for f in ADAPTER_FILES:
        assert (dest / f).read_bytes() == (a / f).read_bytes()
    pulled = json.loads((dest / "manifest.json").read_text())
    assert pulled["name"] == "foo" and pulled["version"] == 1 and pulled["files"] == file_entries(a)
    dest3 = tmp_path / "pulled3"
    assert cli.json("pull", "foo", dest3)["version"] == 3
    assert all((dest3 / f).read_bytes() == (b / f).read_bytes() for f in ADAPTER_FILES)

    # rm: refused while aliased, then forced; the aliases disappear
    line = one_line_error(cli("rm", "foo@1"), rc=1, contains="alias")
    assert "candidate" in line and "prod" in line and "--force" in line
    assert cli.json("show", "foo@1")["version"] == 1  # still there
    assert cli.ok("rm", "foo@1", "--force").strip() == "removed foo@1"
    one_line_error(cli("show", "foo@1"), rc=1, contains="not found")
    for alias in ("prod", "candidate", "staging"):
        one_line_error(cli("show", f"foo@{alias}"), rc=1, contains=f"no alias '{alias}'")
    assert [(v["version"], v["aliases"]) for v in cli.json("ls", "foo")] == [(2, []), (3, ["latest"])]
    assert cli.json("ls")[1]["aliases"] == {"latest": 3}
    assert cli.json("show", "foo@2")["aliases"] == []
    # prod's last move was the removal (1 -> none); rolling back would target the removed foo@1
    one_line_error(cli("rollback", "foo", "prod"), rc=1, contains="foo@1 not found")

    # version numbers are never reused: remove the newest, push its content again
    assert cli.json("rm", "foo@3") == {"removed": "foo@3"}
    assert [v["version"] for v in cli.json("ls", "foo")] == [2]
    out = cli.ok("push", b, "--name", "foo", "--base-model", base_dir)
    assert out.startswith("pushed foo@4 "), out
    assert [(v["version"], v["aliases"]) for v in cli.json("ls", "foo")] == [(2, []), (4, ["latest"])]
    assert cli.json("show", "foo")["files"] == file_entries(b)

    # everything lived in the temporary homes, never in ~/.loraplex
    assert (tmp_path / "lphome" / "cache").is_dir()
    assert not (tmp_path / "userhome" / ".loraplex").exists()


# ---- errors ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_registry_errors_are_one_line(cli, make_adapter, base_dir, tmp_path):
    """Errors that need a registry holding something, on both backends; every case is checked, then reported."""
    a = make_adapter()
    cli.ok("push", a, "--name", "foo", "--base-model", base_dir, "--alias", "candidate")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((a / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    cases = [
        (["show", "nope"], "adapter 'nope' not found"),
        (["ls", "nope"], "not found"),
        (["pull", "nope", tmp_path / "never"], "not found"),
        (["show", "foo@9"], "foo@9 not found"),
        (["pull", "foo@9", tmp_path / "never"], "foo@9 not found"),
        (["tag", "foo@9", "prod"], "foo@9 not found"),
        (["rm", "foo@9"], "not found"),
        (["show", "foo@nope"], "no alias 'nope'"),
        (["show", "nope@prod"], "adapter 'nope' not found"),
        (["show", "../x"], "invalid adapter name '../x'"),
        (["show", "A"], "invalid adapter name 'A'"),
        (["ls", "../x"], "invalid adapter name"),
        (["push", a, "--name", "../x"], "invalid adapter name '../x'"),
        (["push", a, "--name", "A"], "invalid adapter name 'A'"),
        (["show", "a@@b"], "invalid adapter reference 'a@@b'"),
        (["show", "a@0"], "invalid version in 'a@0'"),
        (["push", tmp_path / "missing", "--name", "x"], "does not exist"),
        (["push", pickled, "--name", "x"], "pickle"),
        (["tag", "foo@1", "latest"], "'latest'"),
        (["push", a, "--name", "foo", "--alias", "latest", "--force"], "'latest'"),
        (["tag", "foo@1", "123"], "invalid alias '123'"),
        (["rollback", "foo", "candidate"], "no earlier version"),
        (["rm", "foo"], "explicit version"),
        (["rm", "foo@1"], "pointed at by alias candidate"),
    ]
    problems = []
    for args, contains in cases:
        p = cli(*args)
        try:
            one_line_error(p, rc=1, contains=contains)
        except AssertionError as exc:
            problems.append(f"loraplex {' '.join(map(str, args))}: {exc}")
    assert not problems, "\n".join(problems)
    assert not (tmp_path / "never").exists()
    # none of the refused operations changed anything
    assert [(v["version"], v["aliases"]) for v in cli.json("ls", "foo")] == [(1, ["candidate", "latest"])]


@pytest.mark.parametrize("args, rc, contains", [
    (["bogus"], 2, "invalid choice: 'bogus'"),
    (["ls", "--no-such-flag"], 2, "unrecognized arguments: --no-such-flag"),
    pytest.param(["push", "somewhere"], 2, "required: --name"),
    pytest.param(["tag", "foo@1"], 2, "required: alias"),
    pytest.param(["push", "somewhere", "--name", "x", "--alias"], 2, "expected one argument"),
    (["ls", "--registry", "ftp://x"], 1, "unsupported scheme 'ftp'"),
    (["ls", "--registry", "s3://"], 1, "missing bucket"),
    (["ls", "--registry", "s3://bucket/p?colour=blue"], 1, "unknown option(s) colour"),
    (["ls", "--registry", "file://host/x"], 1, "absolute path"),
])
def test_usage_errors_are_one_line(folder_cli, args, rc, contains):
    one_line_error(folder_cli(*args, registry=False), rc=rc, contains=contains)


def test_usage_error_line_shape(folder_cli):
    """Whatever their prefix, subcommand usage errors are still one line on stderr with exit 2 and no stdout."""
    for args in (["push", "somewhere"], ["tag", "foo@1"], ["push", "somewhere", "--name", "x", "--alias"]):
        p = folder_cli(*args, registry=False)
        assert p.returncode == 2 and p.stdout == "", p
        assert p.stderr.count("\n") == 1 and p.stderr.startswith("loraplex: error: "), p


def test_registry_path_is_a_file(folder_cli, tmp_path):
    (tmp_path / "plain-file").write_text("not a folder")
    one_line_error(folder_cli("ls", registry=(tmp_path / "plain-file").as_uri()), rc=1)


def test_registry_path_is_a_file_push(folder_cli, tmp_path, make_adapter):
    (tmp_path / "plain-file").write_text("not a folder")
    one_line_error(folder_cli("push", make_adapter(), "--name", "x", registry=(tmp_path / "plain-file").as_uri()),
                   rc=1, contains="not a directory")


@pytest.mark.parametrize("content, contains", [
    ("registry: [unclosed\n", "is unreadable"),
    ("registry: {a: 1\n  b: }}\n", "is unreadable"),
    ("- just\n- a list\n", "must be a mapping"),
    ("registry: /x\ncolour: blue\n", "unknown key(s) colour"),
    ("registry: 42\n", "registry must be a string"),
])
def test_bad_config_file(folder_cli, tmp_path, content, contains):
    home = tmp_path / "lphome"
    home.mkdir()
    (home / "config.yaml").write_text(content)
    line = one_line_error(folder_cli("ls", registry=False), rc=1, contains=contains)
    assert str(home / "config.yaml") in line


# ---- S3 unreachable, refused or missing -------------------------------------------------------------
@pytest.mark.parametrize("command", [["ls"], ["show", "foo"], ["push", "ADAPTER", "--name", "foo"]])
def test_s3_down(tmp_path, make_adapter, command):
    port = free_port()
    env = {**base_env(tmp_path), "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1"}
    (tmp_path / "cwd").mkdir()
    cli = Cli(f"s3://bucket/p?endpoint_url=http://127.0.0.1:{port}", env, tmp_path / "cwd")
    args = [make_adapter() if a == "ADAPTER" else a for a in command]
    start = time.monotonic()
    p = cli(*args, timeout=90)
    elapsed = time.monotonic() - start
    line = one_line_error(p, rc=1, contains="cannot reach S3")
    assert f"127.0.0.1:{port}" in line
    assert elapsed < 60, f"took {elapsed:.1f} s to give up on a closed port"


@pytest.mark.s3
def test_s3_wrong_credentials(seaweed, s3_uri, tmp_path):
    (tmp_path / "cwd").mkdir()
    for key in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):
        env = {**base_env(tmp_path), **seaweed.env(), key: "wrong-wrong-wrong"}
        line = one_line_error(Cli(s3_uri, env, tmp_path / "cwd")("ls"), rc=1, contains="credentials")
        assert "refused access" in line


@pytest.mark.s3
def test_s3_no_credentials(seaweed, s3_uri, tmp_path):
    (tmp_path / "cwd").mkdir()
    one_line_error(Cli(s3_uri, base_env(tmp_path), tmp_path / "cwd")("ls"), rc=1, contains="no S3 credentials")


@pytest.mark.s3
def test_s3_missing_bucket(seaweed, tmp_path):
    (tmp_path / "cwd").mkdir()
    cli = Cli(f"s3://no-such-bucket-here/p?endpoint_url={seaweed.endpoint}", {**base_env(tmp_path), **seaweed.env()},
              tmp_path / "cwd")
    for args in (["ls"], ["show", "foo@1"]):
        line = one_line_error(cli(*args), rc=1, contains="does not exist")
        assert "'no-such-bucket-here'" in line


# ---- registry resolution -----------------------------------------------------------------------------
def test_registry_resolution_order(folder_cli, tmp_path, make_adapter, base_dir):
    home = tmp_path / "lphome"
    home.mkdir()
    from_config, from_env, from_flag = (tmp_path / n for n in ("reg-config", "reg-env", "reg-flag"))

    def used(**kw) -> str:
        out = folder_cli.ok("ls", **kw).strip()
        assert out.startswith("no adapters in "), out
        return out.removeprefix("no adapters in ")

    assert used(registry=False) == (home / "registry").as_uri()  # the default
    (home / "config.yaml").write_text(f"registry: {from_config.as_uri()}\n")
    assert used(registry=False) == from_config.as_uri()
    env = {"LORAPLEX_REGISTRY": from_env.as_uri()}
    assert used(registry=False, env=env) == from_env.as_uri()
    assert used(registry=from_flag.as_uri(), env=env) == from_flag.as_uri()

    # and writes go where reads come from: a push with only the environment set lands in reg-env
    out = folder_cli.ok("push", make_adapter(), "--name", "foo", "--base-model", base_dir, registry=False, env=env)
    assert out.rstrip().endswith(f"to {from_env.as_uri()}")
    assert (from_env / "foo" / "v1" / "manifest.json").is_file()
    assert not from_config.exists() and not from_flag.exists()
    assert [d["name"] for d in folder_cli.json("ls", registry=from_env.as_uri())] == ["foo"]
    assert folder_cli.json("ls", registry=False) == []  # config file's registry: still empty


# ---- progress bars -------------------------------------------------------------------------------------
def test_progress_bar(cli, tmp_path, make_adapter, base_dir):
    big_base = write_base_config(tmp_path / "big-base", BIG_BASE_CONFIG)
    big = write_adapter(tmp_path / "big-adapter", cfg=BIG_BASE_CONFIG, r=64)
    assert (big / "adapter_model.safetensors").stat().st_size > 4 * 1024 * 1024
    bar = {"LORAPLEX_PROGRESS": "1"}

    def has_bar(stderr: str) -> bool:
        return "%|" in stderr or "B/s" in stderr

    p = cli("push", big, "--name", "big", "--base-model", big_base, env=bar)
    assert p.returncode == 0 and p.stdout.startswith("pushed big@1 "), p
    assert has_bar(p.stderr), p.stderr
    assert "error" not in p.stderr

    p = cli("pull", "big", tmp_path / "big-pulled", env=bar)
    assert p.returncode == 0 and has_bar(p.stderr), p
    assert (tmp_path / "big-pulled" / "adapter_model.safetensors").read_bytes() == (big / "adapter_model.safetensors").read_bytes()

    p = cli("push", big, "--name", "big", "--base-model", big_base, "--force")  # LORAPLEX_PROGRESS=0
    assert p.returncode == 0 and p.stdout.startswith("pushed big@2 ") and p.stderr == "", p

    p = cli("push", make_adapter(), "--name", "small", "--base-model", base_dir, env=bar)
    assert p.returncode == 0 and p.stdout.startswith("pushed small@1 ") and p.stderr == "", p


# ---- start-up cost -----------------------------------------------------------------------------------
def test_ls_is_light(folder_cli, make_adapter, base_dir):
    folder_cli.ok("push", make_adapter(), "--name", "foo", "--base-model", base_dir, "--alias", "prod")
    code = (
        "import sys, json\n"
        "from loraplex.cli import main\n"
        f"rcs = [main(['ls', '--registry', {folder_cli.registry!r}]), main(['ls', 'foo', '--registry', {folder_cli.registry!r}]),"
        f" main(['show', 'foo@prod', '--registry', {folder_cli.registry!r}])]\n"
        "print(json.dumps({'rcs': rcs, 'heavy': [m for m in ('torch', 'boto3', 'botocore') if m in sys.modules]}))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], env=folder_cli.env, cwd=folder_cli.cwd, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result == {"rcs": [0, 0, 0], "heavy": []}

    assert LORAPLEX_SCRIPT.is_file()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        out = folder_cli.ok("ls", script=True)
        times.append(time.perf_counter() - start)
        assert out.splitlines()[1].split()[:3] == ["foo", "1", "prod"]
    print(f"\n`loraplex ls --registry <folder>` wall time: median {statistics.median(times) * 1000:.0f} ms "
          f"(runs: {', '.join(f'{t * 1000:.0f}' for t in times)} ms)")


@pytest.mark.parametrize("argv, contains", [
    (["--load-share", "1.5"], "load_share"),
    (["--load-share", "-0.1"], "load_share"),
    (["--load-share", "abc"], "--load-share"),
    (["--max-loras", "0"], "max_loras"),
])
def test_serve_rejects_bad_settings_in_one_line(argv, contains, tmp_path):
    p = subprocess.run([str(LORAPLEX_SCRIPT), "serve", "--port", str(free_port()), *argv], capture_output=True,
                       text=True, timeout=120, env=base_env(tmp_path))
    one_line_error(p, contains=contains)
