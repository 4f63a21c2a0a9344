"""A/B routes: stored in the registry (folder and SeaweedFS S3), sticky weighted picks, CLI end to end."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from loraplex.adapters import AdapterRegistry, ConfigError, InvalidNameError, LoraplexError, NotFoundError
from loraplex.adapters.routes import MAX_ARMS, ROUTES_PREFIX, Arm, Route, RouteStore, parse_split

USERS = [f"user-{i}" for i in range(1000)]


@pytest.fixture
def bots(registry, make_adapter) -> AdapterRegistry:
    """support-bot@1..3 (prod -> 2) and support-bot-v2@1."""
    for seed in range(3):
        registry.push(make_adapter(seed=seed), "support-bot")
    registry.push(make_adapter(seed=9), "support-bot-v2")
    registry.tag("support-bot@2", "prod")
    return registry


def _route(*arms: tuple[str, float], name: str = "support-bot") -> Route:
    return Route(name, tuple(Arm(ref, int(ref.rpartition("@")[2]), w) for ref, w in arms), "t", None, 1)


def _shares(route: Route, users=USERS) -> dict[str, float]:
    counts = Counter(route.pick(u).ref for u in users)
    return {a.ref: counts[a.ref] / len(users) for a in route.arms}


# ---- storage ----------------------------------------------------------------------------------
def test_set_get_history_delete_round_trip(bots):
    store = RouteStore(bots)
    assert store.get("support-bot") is None and store.history("support-bot") == [] and store.names() == []
    r1 = store.set("support-bot", {"support-bot@prod": 90, "support-bot@3": 10}, by="ana@lab")
    assert [(a.ref, a.version, a.weight) for a in r1.arms] == [("support-bot@2", 2, 90.0), ("support-bot@3", 3, 10.0)]
    assert (r1.name, r1.seq, r1.by, r1.action) == ("support-bot", 1, "ana@lab", "set") and r1.created_at.endswith("Z")
    assert r1.shares == {"support-bot@2": 0.9, "support-bot@3": 0.1}
    assert store.get("support-bot") == r1
    # Moving the alias afterwards does not change the pinned arm.
    bots.tag("support-bot@1", "prod")
    r2 = store.set("support-bot", [("support-bot@3", 1), ("support-bot-v2", 1)])  # bare name: latest, pinned
    assert [a.ref for a in r2.arms] == ["support-bot@3", "support-bot-v2@1"] and r2.seq == 2 and r2.by
    # Another replica (a fresh registry client) reads the same route and history.
    other = RouteStore(AdapterRegistry(bots.uri))
    assert other.get("support-bot") == r2
    assert other.history("support-bot") == [r1, r2]
    assert other.names() == ["support-bot"]
    # The routes folder is not an adapter.
    assert bots.names() == ["support-bot", "support-bot-v2"]
    assert AdapterRegistry(bots.uri).names() == ["support-bot", "support-bot-v2"]
    assert all(k.startswith(f"{ROUTES_PREFIX}/support-bot/") for k in bots.storage.list(f"{ROUTES_PREFIX}/"))

    t = store.delete("support-bot", by="bo@lab")
    assert (t.seq, t.action, t.arms, t.deleted, t.by) == (3, "delete", (), True, "bo@lab")
    assert other.get("support-bot") is None and other.names() == []
    assert [e.action for e in other.history("support-bot")] == ["set", "set", "delete"]
    with pytest.raises(NotFoundError, match="no route 'support-bot'"):
        store.delete("support-bot")
    with pytest.raises(NotFoundError, match="deleted"):
        t.pick("u1")
    r4 = store.set("support-bot", {"support-bot@1": 1})  # set again after a delete
    assert r4.seq == 4 and other.get("support-bot") == r4 and r4.pick("anyone").ref == "support-bot@1"


def test_get_cached_rereads_after_max_age(bots):
    store, writer = RouteStore(bots), RouteStore(AdapterRegistry(bots.uri))
    assert store.get_cached("support-bot") is None  # absence is cached too
    writer.set("support-bot", {"support-bot@1": 1})
    assert store.get_cached("support-bot") is None
    assert store.get_cached("support-bot", max_age=0).arms[0].ref == "support-bot@1"
    store.set("support-bot", {"support-bot@2": 1})  # the store's own writes drop its cache entry
    assert store.get_cached("support-bot").arms[0].ref == "support-bot@2"


def test_eight_concurrent_sets_are_all_recorded(bots):
    splits = [{"support-bot@1": i + 1, "support-bot@2": 10} for i in range(8)]

    def set_one(split):
        return RouteStore(AdapterRegistry(bots.uri)).set("support-bot", split)  # one client per "replica"

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(set_one, splits))
    history = RouteStore(bots).history("support-bot")
    assert [e.seq for e in history] == list(range(1, 9))
    assert sorted(r.seq for r in results) == list(range(1, 9))
    assert sorted(e.arms[0].weight for e in history) == [float(i + 1) for i in range(8)]
    assert len(bots.storage.list(f"{ROUTES_PREFIX}/support-bot/")) == 8


def test_bad_input_is_refused_with_one_line_errors_and_nothing_written(bots):
    store = RouteStore(bots)
    ok = "support-bot@1"
    cases = [
        (lambda: store.set("support-bot", {"support-bot@9": 1}), NotFoundError, "support-bot@9 not found"),
        (lambda: store.set("support-bot", {"nobody@1": 1}), NotFoundError, "nobody@1 not found"),
        (lambda: store.set("support-bot", {"support-bot@canary": 1}), NotFoundError, "no alias 'canary'"),
        (lambda: store.set("support-bot", {ok: 0}), ConfigError, "positive finite"),
        (lambda: store.set("support-bot", {ok: -1}), ConfigError, "positive finite"),
        (lambda: store.set("support-bot", {ok: math.nan}), ConfigError, "positive finite"),
        (lambda: store.set("support-bot", {ok: math.inf}), ConfigError, "positive finite"),
        (lambda: store.set("support-bot", {ok: "x"}), ConfigError, "must be a number"),
        (lambda: store.set("support-bot", {ok: True}), ConfigError, "must be a number"),
        (lambda: store.set("support-bot", {}), ConfigError, "empty split"),
        (lambda: store.set("support-bot", []), ConfigError, "empty split"),
        (lambda: store.set("support-bot", [(ok, 1), (ok, 2)]), ConfigError, "twice"),
        (lambda: store.set("support-bot", {ok: 1, "support-bot@v1": 2}), ConfigError, "twice"),
        (lambda: store.set("support-bot", {"support-bot@prod": 1, "support-bot@2": 1}), ConfigError, "twice"),
        (lambda: store.set("support-bot", [(ok, 1)] * (MAX_ARMS + 1)), ConfigError, "at most 16"),
        (lambda: store.set("support-bot", [ok]), ConfigError, r"not a \(ref, weight\) pair"),
        (lambda: store.set("support-bot", "support-bot@1=1"), ConfigError, "mapping or a list"),
        (lambda: store.set("Bad Name", {ok: 1}), InvalidNameError, "invalid route name"),
        (lambda: store.set("../etc", {ok: 1}), InvalidNameError, "invalid route name"),
        (lambda: store.set("support-bot", {"Bad@@1": 1}), InvalidNameError, "invalid adapter reference"),
        (lambda: store.get("_routes"), InvalidNameError, "invalid route name"),
        (lambda: store.delete("support-bot"), NotFoundError, "no route"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match) as info:
            call()
        assert "\n" not in str(info.value) and isinstance(info.value, LoraplexError)
    assert bots.storage.list(f"{ROUTES_PREFIX}/") == [] and store.names() == []
    # 16 distinct arms is the limit, not an error.
    refs = [f"support-bot@{v}" for v in (1, 2, 3)] + ["support-bot-v2@1"]
    assert len(store.set("support-bot", dict.fromkeys(refs, 1)).arms) == 4


def test_parse_split():
    assert parse_split("support-bot@3=90,support-bot@4=10") == [("support-bot@3", 90.0), ("support-bot@4", 10.0)]
    assert parse_split(" a@1 = 2.5 , b = 50% ") == [("a@1", 2.5), ("b", 50.0)]
    for text, match in [("", "empty split"), ("   ", "empty split"), ("a@1=90,", "entry 2 is empty"),
                        ("a@1", "not REF=WEIGHT"), ("=5", "not REF=WEIGHT"), ("a@1=x", "is not a number"),
                        ("a@1=", "is not a number"), ("a@1=0", "positive finite"), ("a@1=-3", "positive finite"),
                        ("a@1=nan", "positive finite"), ("a@1=inf", "positive finite"), ("a@1=1e999", "positive finite")]:
        with pytest.raises(ConfigError, match=match):
            parse_split(text)
    with pytest.raises(InvalidNameError):
        parse_split("A@1=5")


# ---- picking ----------------------------------------------------------------------------------
def test_sticky_picks_match_the_weights(bots):
    store = RouteStore(bots)
    r = store.set("support-bot", {"support-bot@1": 90, "support-bot@2": 10})
    shares = _shares(r)
    assert abs(shares["support-bot@1"] - 0.9) <= 0.03 and abs(shares["support-bot@2"] - 0.1) <= 0.03, shares
    # Sticky: the same user five times, and from another replica's store, gets the same arm.
    replica = RouteStore(AdapterRegistry(bots.uri)).get("support-bot")
    for u in USERS:
        first = r.pick(u)
        assert all(r.pick(u) == first for _ in range(4)) and replica.pick(u) == first
    three = store.set("support-bot", {"support-bot@1": 50, "support-bot@2": 30, "support-bot-v2@1": 20})
    shares = _shares(three)
    for ref, want in {"support-bot@1": 0.5, "support-bot@2": 0.3, "support-bot-v2@1": 0.2}.items():
        assert abs(shares[ref] - want) <= 0.03, shares


def test_picks_are_the_same_in_another_process():
    r = _route(("support-bot@1", 90), ("support-bot@2", 10))
    here = [r.pick(u).ref for u in USERS[:200]]
    code = ("import json, sys\nfrom adapters.routes import Arm, Route\n"
            "r = Route('support-bot', (Arm('support-bot@1', 1, 90.0), Arm('support-bot@2', 2, 10.0)), 't', None, 1)\n"
            "print(json.dumps([r.pick(f'user-{i}').ref for i in range(200)]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a different str hash: must not matter
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert json.loads(out) == here


def test_changing_the_split_moves_only_the_needed_users(bots):
    store = RouteStore(bots)
    a, b = "support-bot@1", "support-bot@2"
    first = store.set("support-bot", {a: 90, b: 10})
    before = {u: first.pick(u).ref for u in USERS}
    store.set("support-bot", {a: 80, b: 20})
    after_route = RouteStore(AdapterRegistry(bots.uri)).get("support-bot")  # as another replica reads it
    after = {u: after_route.pick(u).ref for u in USERS}
    moved = [u for u in USERS if before[u] != after[u]]
    assert 0.07 <= len(moved) / len(USERS) <= 0.13, len(moved)
    assert all(before[u] == a and after[u] == b for u in moved)
    # A third arm at weight 10 only takes users; nobody moves between the old arms.
    c = "support-bot-v2@1"
    third = store.set("support-bot", {a: 80, b: 20, c: 10})
    with_c = {u: third.pick(u).ref for u in USERS}
    moved = [u for u in USERS if with_c[u] != after[u]]
    assert all(with_c[u] == c for u in moved)
    assert 0.06 <= len(moved) / len(USERS) <= 0.125, len(moved)  # expected 10/110 = 9.1%
    # Removing it again puts exactly those users back where they were.
    again = store.set("support-bot", {a: 80, b: 20})
    assert {u: again.pick(u).ref for u in USERS} == after


def test_routes_of_different_names_split_users_independently():
    r1 = _route(("x@1", 50), ("x@2", 50), name="one")
    r2 = _route(("x@1", 50), ("x@2", 50), name="two")
    same = sum(r1.pick(u).ref == r2.pick(u).ref for u in USERS)
    assert 400 <= same <= 600  # independent halves agree about half the time


def test_without_a_user_picks_are_weighted_random():
    r = _route(("support-bot@1", 90), ("support-bot@2", 10))
    for user in (None, ""):
        rng = random.Random(7)
        counts = Counter(r.pick(user, rng).ref for _ in range(2000))
        assert abs(counts["support-bot@1"] / 2000 - 0.9) <= 0.03, counts
    rng1, rng2 = random.Random(3), random.Random(3)
    assert [r.pick(None, rng1) for _ in range(50)] == [r.pick(None, rng2) for _ in range(50)]
    three = _route(("a@1", 1), ("b@1", 2), ("c@1", 7))
    rng = random.Random(11)
    counts = Counter(three.pick(None, rng).ref for _ in range(2000))
    for ref, want in {"a@1": 0.1, "b@1": 0.2, "c@1": 0.7}.items():
        assert abs(counts[ref] / 2000 - want) <= 0.03, counts
    assert {r.pick(None).ref for _ in range(200)} == {"support-bot@1", "support-bot@2"}  # SystemRandom
    assert _route(("solo@4", 3)).pick("u").ref == "solo@4"


# ---- CLI --------------------------------------------------------------------------------------
def test_cli_route_set_show_delete(tmp_path, make_adapter):
    home = tmp_path / "lphome"
    reg = AdapterRegistry((home / "registry").as_uri())
    for seed in range(2):
        reg.push(make_adapter(seed=seed), "support-bot")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAPLEX_", "AWS_"))}
    env.update(LORAPLEX_HOME=str(home), LORAPLEX_PROGRESS="0")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "loraplex", "route", *args], env=env, capture_output=True,
                              text=True, timeout=60)

    p = cli("support-bot", "--split", "support-bot@1=90,support-bot@latest=10")
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert p.stdout.strip() == "route support-bot: support-bot@1 90%, support-bot@2 10% (entry 1)"
    p = cli("support-bot", "--split", "support-bot@1=80,support-bot@2=20", "--json")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert data["seq"] == 2 and [a["ref"] for a in data["arms"]] == ["support-bot@1", "support-bot@2"]

    p = cli("support-bot")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("route support-bot  (entry 2, set ")
    assert "support-bot@1  80%    80" in p.stdout and "support-bot@2  20%    20" in p.stdout
    assert "support-bot@1=90,support-bot@2=10" in p.stdout and "support-bot@1=80,support-bot@2=20" in p.stdout
    shown = json.loads(cli("support-bot", "--json").stdout)
    assert shown["route"]["seq"] == 2 and shown["shares"] == {"support-bot@1": 0.8, "support-bot@2": 0.2}
    assert [e["seq"] for e in shown["history"]] == [1, 2]
    assert RouteStore(reg).get("support-bot").pick("u").ref in {"support-bot@1", "support-bot@2"}

    p = cli("support-bot", "--delete")
    assert p.returncode == 0 and p.stdout.strip() == "deleted route support-bot (entry 3)", p.stderr
    p = cli("support-bot")
    assert p.returncode == 0 and p.stdout.startswith("route support-bot: deleted ")
    assert json.loads(cli("support-bot", "--json").stdout)["route"] is None
    assert RouteStore(reg).get("support-bot") is None

    for args, contains in [(("support-bot", "--split", "support-bot@1=90,support-bot@2=x"), "not a number"),
                           (("support-bot", "--split", "support-bot@7=1"), "support-bot@7 not found"),
                           (("support-bot", "--split", ""), "empty split"),
                           (("support-bot", "--delete"), "no route"),
                           (("nothing-here",), "no route 'nothing-here'"),
                           (("Bad",), "invalid route name")]:
        p = cli(*args)
        assert p.returncode == 1 and p.stdout == "", (args, p.stdout, p.stderr)
        assert p.stderr.count("\n") == 1 and p.stderr.startswith("loraplex: error:") and contains in p.stderr, p.stderr
    assert len(RouteStore(reg).history("support-bot")) == 3  # the refused commands wrote nothing
    p = cli("support-bot", "--split", "support-bot@1=1", "--delete")
    assert p.returncode == 2 and p.stderr.startswith("loraplex: error:")
