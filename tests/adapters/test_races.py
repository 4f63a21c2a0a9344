"""Concurrent pushes and pushes killed midway, in real processes, against both backends."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from adapter_factory import write_adapter
from loraplex.adapters import AdapterRegistry
from loraplex.adapters.basemodel import SMOLLM2_135M

PUSH = textwrap.dedent("""
    import sys
    from loraplex.adapters import AdapterRegistry
    uri, folder, name, force = sys.argv[1:5]
    r = AdapterRegistry(uri).push(folder, name, force=force == "1", message=folder)
    print(r.manifest.version)
""")

SMOLLM2_CFG = {k: getattr(SMOLLM2_135M, k) for k in (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")}


def _push_proc(uri: str, folder, name: str, env: dict, force: bool = False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PUSH, uri, str(folder), name, "1" if force else "0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def proc_env(registry_uri, tmp_path):
    env = dict(os.environ, LORAPLEX_HOME=str(tmp_path / "home"))
    return env  # AWS_* for the S3 backend were set on os.environ by the registry_uri fixture


def test_eight_parallel_pushes_get_eight_intact_versions(registry, registry_uri, tmp_path, proc_env):
    folders = [write_adapter(tmp_path / f"a{i}", seed=i) for i in range(8)]
    procs = [_push_proc(registry_uri, f, "shared", proc_env) for f in folders]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    versions = sorted(int(o[0]) for o in outs)
    assert versions == list(range(1, 9))
    assert registry.version_numbers("shared") == versions
    by_message = {m.message: m for m in registry.versions("shared")}
    assert set(by_message) == {str(f) for f in folders}
    for folder in folders:
        m, local = registry.fetch(f"shared@{by_message[str(folder)].version}")  # sha256-verified and validated
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            assert (local / f).read_bytes() == (folder / f).read_bytes()


@pytest.mark.slow
def test_push_killed_at_random_points_leaves_no_partial_version(registry, registry_uri, tmp_path, proc_env):
    """A 19 MB adapter (SmolLM2, r=16, all seven projections, fp32) pushed and SIGKILLed midway."""
    folder = write_adapter(tmp_path / "big", cfg=SMOLLM2_CFG, r=16, base="smollm2-135m-instruct")
    assert (folder / "adapter_model.safetensors").stat().st_size > 19_000_000
    t = time.monotonic()
    done = _push_proc(registry_uri, folder, "big", proc_env, force=True)
    assert done.wait(120) == 0, done.stderr.read()
    duration = time.monotonic() - t
    rng = random.Random(1234)
    for _ in range(6):
        p = _push_proc(registry_uri, folder, "big", proc_env, force=True)
        time.sleep(rng.uniform(0.05, duration))
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
        p.stderr.close()
    fresh = AdapterRegistry(registry_uri, cache=registry.cache)
    visible = fresh.version_numbers("big")
    assert visible[0] == 1
    for v in visible:  # every visible version is whole: hashes match, tensors validate
        fresh.fetch(f"big@{v}")
    again = _push_proc(registry_uri, folder, "big", proc_env, force=True)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert int(out) > max(visible) and fresh.version_numbers("big")[-1] == int(out)
    print(f"push took {duration:.2f}s; visible after kills: {visible}; re-run got v{int(out)}")


def test_concurrent_creates_and_deletes_in_one_folder_never_fail(tmp_path):
    """A delete removes the folders it leaves empty; a writer whose folder vanishes between its mkdir and its
    open must retry, not fail (eight pushers probing `.loraplex/` at once hit exactly this)."""
    import threading

    from loraplex.adapters.storage import open_storage

    storage = open_storage(tmp_path.as_uri())
    errors: list[BaseException] = []

    def churn(i: int) -> None:
        try:
            for j in range(150):
                key = f".loraplex/probe-{i}-{j}"
                assert storage.create(key, b"x") and not storage.create(key, b"y")
                storage.delete(key)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
