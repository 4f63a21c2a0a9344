"""Registry guards (issue 12): what keeps versions and the store's guarantees honest. Every test runs against a
folder registry and a real SeaweedFS S3 bucket. Failure modes covered, one per test name:

* ``rm`` of a version an A/B route arm points at (the route would send traffic to nothing): refused with
  one line naming the route; ``--force`` drops the arm (a route left without arms is deleted);
* a version whose manifest was tampered with, which would block ``ls NAME`` and pushes of NAME: ``rm``
  names ``--force``, which removes it;
* a version removed by another process keeps resolving in a long-lived reader: it stops for a reader that
  re-checks (``max_age``), which still serves what it knows while the store is down;
* a store that ignores conditional writes (``If-None-Match: *``), so that two pushes could share a version
  number: caught by a probe before the first write, and every write fails with a clear error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from cli_checks import one_line_error
from loraplex.adapters import AdapterCache, AdapterRegistry, ConflictError, IntegrityError, NotFoundError, StorageError
from loraplex.adapters.errors import ConditionalWriteError
from loraplex.adapters.routes import RouteStore
from loraplex.adapters.storage import PROBE_PREFIX


# ---- rm and route arms --------------------------------------------------------------------------------
def test_rm_refuses_a_version_a_route_arm_points_at_then_force_drops_the_arm(registry, make_adapter):
    for seed in range(3):
        registry.push(make_adapter(seed=seed), "bot")
    routes = RouteStore(registry)
    routes.set("support", {"bot@1": 90, "bot@2": 10})
    routes.set("canary", {"bot@2": 1})
    with pytest.raises(ConflictError) as info:
        registry.remove("bot@2")
    assert str(info.value) == "bot@2 is an arm of route canary, support; change the route first or use --force"
    assert registry.version_numbers("bot") == [1, 2, 3]
    registry.tag("bot@1", "prod")
    with pytest.raises(ConflictError, match="^bot@1 is pointed at by alias prod and is an arm of route support; "
                                            "move the alias and change the route first or use --force$"):
        registry.remove("bot@1")
    registry.remove("bot@3")  # nothing points at it
    registry.remove("bot@2", force=True, by="ops@lab")
    assert registry.version_numbers("bot") == [1]
    support = routes.get("support")
    assert [a.ref for a in support.arms] == ["bot@1"] and (support.action, support.by) == ("rm", "ops@lab")
    assert routes.get("canary") is None and routes.history("canary")[-1].action == "delete"
    assert routes.names() == ["support"]


def test_cli_rm_with_a_route_arm_is_a_one_line_error_then_force_works(registry, make_adapter, tmp_path):
    registry.push(make_adapter(seed=1), "bot")
    registry.push(make_adapter(seed=2), "bot")
    RouteStore(registry).set("support", {"bot@1": 1, "bot@2": 1})
    env = dict(os.environ, LORAPLEX_HOME=str(tmp_path / "lphome"), HOME=str(tmp_path), LORAPLEX_PROGRESS="0")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "loraplex", *args, "--registry", registry.uri], env=env,
                              capture_output=True, text=True, timeout=120)

    line = one_line_error(cli("rm", "bot@2"), rc=1, contains="an arm of route support")
    assert "--force" in line
    done = cli("rm", "bot@2", "--force")
    assert done.returncode == 0 and done.stdout.strip() == "removed bot@2", done.stderr
    assert [a.ref for a in RouteStore(AdapterRegistry(registry.uri)).get("support").arms] == ["bot@1"]


def test_version_with_a_tampered_manifest_is_removed_only_with_force(registry, make_adapter):
    """Failure mode: an invalid manifest would otherwise block ``ls NAME`` and pushes of NAME for good."""
    registry.push(make_adapter(seed=1), "m", alias="prod")
    registry.push(make_adapter(seed=2), "m")
    registry.storage.write("m/v1/manifest.json", b'{"name": "m", "version": 1, "files": {"../x": {}}}')
    reader = AdapterRegistry(registry.uri)
    with pytest.raises(IntegrityError, match=r"^manifest m@1 is invalid: .*; `loraplex rm m@1 --force` removes it$"):
        reader.remove("m@1")
    assert reader.remove("m@1", force=True) is None
    assert reader.version_numbers("m") == [2] and reader.aliases("m") == {"latest": 2}
    assert reader.storage.list("m/v1/") == ["m/v1/.claim"]


def test_removed_version_stops_resolving_for_a_reader_that_rechecks(registry, make_adapter, monkeypatch):
    """Failure mode: a long-lived reader (a server) keeps serving a version another process removed."""
    registry.push(make_adapter(seed=1), "m")
    registry.push(make_adapter(seed=2), "m")
    reader = AdapterRegistry(registry.uri)
    assert reader.manifest("m", 1).version == 1
    AdapterRegistry(registry.uri).remove("m@1")
    assert reader.manifest("m", 1).version == 1  # without max_age: kept (the bytes are immutable)
    with pytest.raises(NotFoundError, match="m@1 not found"):
        reader.manifest("m", 1, max_age=0)
    with pytest.raises(NotFoundError):
        reader.resolve("m@1")  # evicted for good
    # Stale-while-error: with the store down, a kept manifest is still served; only NotFound evicts it.
    assert reader.manifest("m", 2).version == 2

    def down(*a, **k):
        raise StorageError("cannot reach the store")

    monkeypatch.setattr(reader.storage, "read", down)
    assert reader.manifest("m", 2, max_age=0).version == 2


# ---- conditional writes --------------------------------------------------------------------------------
def test_conditional_write_probe_passes_once_on_a_store_that_honours_it(registry, make_adapter, monkeypatch):
    """SeaweedFS answers 412 to the second exclusive create, a folder's os.link fails: the probe passes and leaves nothing."""
    creates: list[str] = []
    original = registry.storage.create
    monkeypatch.setattr(registry.storage, "create", lambda key, data: creates.append(key) or original(key, data))
    registry.push(make_adapter(seed=1), "m", alias="prod")
    registry.push(make_adapter(seed=2), "m")
    RouteStore(registry).set("r", {"m@1": 1})
    probes = [k for k in creates if k.startswith(PROBE_PREFIX)]
    assert len(probes) == 2 and probes[0] == probes[1]  # one probe key, created twice, for this client's first write
    assert creates[:2] == probes
    assert registry.storage.list(".loraplex/") == []


def _ignore_exclusivity(registry: AdapterRegistry, backend: str, monkeypatch) -> None:
    """Fault injection: make the real store behave like one without conditional writes."""
    if backend == "file":  # os.link refuses an existing target; a copy overwrites it
        monkeypatch.setattr(os, "link", lambda src, dst: shutil.copyfile(src, dst))
    else:  # SeaweedFS itself, with the If-None-Match header never sent
        client = registry.storage._client
        put = client.put_object
        monkeypatch.setattr(client, "put_object", lambda **kw: put(**{k: v for k, v in kw.items() if k != "IfNoneMatch"}))


def test_store_ignoring_if_none_match_fails_pushes_with_a_clear_error(registry_uri, backend, make_adapter, tmp_path,
                                                                      monkeypatch):
    """Failure mode: two pushes sharing a version number on a store whose exclusive create is not exclusive."""
    ok = AdapterRegistry(registry_uri)
    ok.push(make_adapter(seed=1), "m")
    registry = AdapterRegistry(registry_uri, cache=AdapterCache(tmp_path / "cache"))
    with monkeypatch.context() as faulty:
        _ignore_exclusivity(registry, backend, faulty)
        for write in (lambda: registry.push(make_adapter(seed=2), "m"), lambda: registry.tag("m@1", "prod"),
                      lambda: RouteStore(registry).set("r", {"m@1": 1})):
            with pytest.raises(ConditionalWriteError) as info:
                write()
            message = str(info.value)
            assert "\n" not in message and "does not honour exclusive creates" in message
            assert "two pushes could share a version number" in message
    assert ok.version_numbers("m") == [1] and ok.storage.list("m/v2/") == []  # nothing claimed, nothing pushed
    assert ok.aliases("m") == {"latest": 1} and RouteStore(ok).get("r") is None
    assert ok.storage.list(".loraplex/") == []  # the probe key was removed
    assert registry.fetch("m@1")[0].version == 1  # reading is unaffected


# ---- log entries read from the bucket are bounded like the ones written here --------------------------------
@pytest.mark.parametrize("arms", [
    [{"ref": "a@1", "version": 1, "weight": "nan"}], [{"ref": "a@1", "version": 1, "weight": float("inf")}],
    [{"ref": "a@1", "version": 1, "weight": 0}], [{"ref": "a@1", "version": 1, "weight": -1}],
    [{"ref": f"a@{i}", "version": i, "weight": 1} for i in range(1, 100)], "not a list", [],
])
def test_a_tampered_route_entry_is_an_integrity_error(arms):
    import json as _json

    from loraplex.adapters.errors import IntegrityError
    from loraplex.adapters.routes import Route

    raw = _json.dumps({"name": "r", "arms": arms, "created_at": "t", "by": None, "seq": 1, "action": "set"}).encode()
    with pytest.raises(IntegrityError, match="route entry"):
        Route.from_json(raw, "routes/r/0000000001.json")


@pytest.mark.parametrize("entry", [
    {"alias": "prod", "version": "x", "previous": None, "at": "t", "by": None, "action": "tag"},
    {"alias": "prod", "version": True, "previous": None, "at": "t", "by": None, "action": "tag"},
    {"alias": "prod", "version": 0, "previous": None, "at": "t", "by": None, "action": "tag"},
    {"alias": "prod", "version": 1, "previous": -3, "at": "t", "by": None, "action": "tag"},
    {"alias": ["x"], "version": 1, "previous": None, "at": "t", "by": None, "action": "tag"},
    {"alias": "prod", "version": 1, "previous": None, "at": "t", "by": None, "action": "tag", "extra": 1},
])
def test_a_tampered_alias_entry_is_an_integrity_error(entry):
    import json as _json

    from loraplex.adapters.errors import IntegrityError
    from loraplex.adapters.registry import _alias_event

    with pytest.raises(IntegrityError, match="alias entry"):
        _alias_event(_json.dumps(entry).encode(), "x/aliases/prod/0000000001.json")


@pytest.mark.parametrize("field, value, expected", [
    ("message", "release\x1b[2J\x1b]0;pwned\x07", "the message contains control characters"),
    ("message", "m" * 9000, "the message is 9000 characters long"),
    ("creator", "me\nroot", "the creator contains control characters"),
    ("training", {"log": "x" * 300_000}, "the training record is larger than"),
])
def test_push_refuses_text_a_terminal_would_act_on_and_writes_nothing(registry, make_adapter, field, value, expected):
    """What push writes, every later reader must accept: the manifest's text fields are bounded and printable."""
    from loraplex.adapters.errors import InvalidNameError

    with pytest.raises(InvalidNameError, match=expected):
        registry.push(make_adapter(), "txt", **{field: value})
    assert registry.names() == []
    ok = registry.push(make_adapter(), "txt", message="line one\nline two\tand a tab")  # newlines and tabs are text
    assert registry.versions("txt")[0].message == "line one\nline two\tand a tab" and ok.created
