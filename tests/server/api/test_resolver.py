"""Resolver.resolve as a table: a request's ``model`` / ``adapters`` / ``merge`` and a key in, what the engine
serves (or the error) out. A real folder registry of tiny adapters (numpy; no torch): helper@1 (alias prod),
helper@2, acme-bot@1; the route ``split`` sends every user to helper@1; ``mine`` is admin-loaded. Then tenant
isolation: names are authorized as sent, before the registry is asked; absent names are remembered."""

from __future__ import annotations

import dataclasses

import pytest
from adapter_factory import write_adapter, write_base_config

from loraplex.adapters import AdapterCache, AdapterRegistry
from loraplex.adapters.basemodel import resolve_base_model
from loraplex.adapters.errors import IncompatibleBaseError, InvalidAdapterError, LoraplexError, NotFoundError
from loraplex.adapters.routes import Arm, Route, RouteStore
from loraplex.server.api.auth import Principal
from loraplex.server.api.resolver import Resolver
from loraplex.server.api.schemas import ChatCompletionRequest

BASE = "tiny-base"
EVERYONE = Principal("ops", frozenset({"inference", "admin"}))
ACME = Principal("acme", frozenset({"inference"}), ("acme-*",))


@pytest.fixture(scope="module")
def resolver(tmp_path_factory) -> Resolver:
    root = tmp_path_factory.mktemp("resolver")
    base = write_base_config(root / BASE)
    reg = AdapterRegistry((root / "registry").as_uri(), cache=AdapterCache(root / "cache"))
    reg.push(write_adapter(root / "h1", seed=1), "helper", base_model=str(base))
    reg.push(write_adapter(root / "h2", seed=2), "helper", base_model=str(base))
    reg.tag("helper@1", "prod")
    reg.push(write_adapter(root / "a1", seed=3), "acme-bot", base_model=str(base))
    routes = RouteStore(reg)
    routes.set("split", [("helper@1", 1.0)])
    r = Resolver(reg, BASE, resolve_base_model(str(base)), routes=routes)
    r.add_local("mine", write_adapter(root / "mine", seed=4))
    return r


def merged(sources, merge) -> str:
    return "merge(" + ",".join(sources) + f";{merge['strategy']})"


OK = {
    # name: (request fields, key, (engine adapters, display, metrics label, version))
    "base by id": ({"model": BASE}, ACME, ([], BASE, "base", "")),
    "base by word": ({"model": "base"}, EVERYONE, ([], BASE, "base", "")),
    "latest": ({"model": "helper"}, EVERYONE, ([("helper@2", 1.0)], "helper@2", "helper", "2")),
    "a version": ({"model": "helper@1"}, EVERYONE, ([("helper@1", 1.0)], "helper@1", "helper", "1")),
    "v-prefixed version": ({"model": "helper@v2"}, EVERYONE, ([("helper@2", 1.0)], "helper@2", "helper", "2")),
    "an alias": ({"model": "helper@prod"}, EVERYONE, ([("helper@1", 1.0)], "helper@1", "helper", "1")),
    "base-qualified": ({"model": f"{BASE}:helper@prod"}, EVERYONE, ([("helper@1", 1.0)], "helper@1", "helper", "1")),
    "a route": ({"model": "split"}, EVERYONE, ([("helper@1", 1.0)], "helper@1", "helper", "1")),
    "the tenant's own": ({"model": "acme-bot"}, ACME, ([("acme-bot@1", 1.0)], "acme-bot@1", "acme-bot", "1")),
    "a mixture": ({"model": "base", "adapters": [{"name": "helper@1", "weight": 0.25}, {"name": "acme-bot",
                   "weight": 0.75}]}, EVERYONE,
                  ([("helper@1", 0.25), ("acme-bot@1", 0.75)], "helper@1*0.25+acme-bot@1*0.75", "mix", "")),
    "a merge": ({"model": "base", "adapters": [{"name": "helper@1", "weight": 1}, {"name": "helper@2", "weight": 1}],
                 "merge": {"strategy": "linear"}}, EVERYONE,
                ([("merge(helper@1,helper@2;linear)", 1.0)], "merge(helper@1,helper@2;linear)", "merge", "")),
}

FAIL = {
    # name: (request fields, key, error type, text in the message)
    "absent": ({"model": "nobody"}, EVERYONE, NotFoundError, "`nobody` does not exist"),
    "absent version": ({"model": "helper@9"}, EVERYONE, NotFoundError, "does not exist"),
    "bad name": ({"model": "../etc"}, EVERYONE, NotFoundError, "does not exist"),
    "another base": ({"model": "other-base:helper"}, EVERYONE, NotFoundError, "does not exist"),
    "another tenant's": ({"model": "helper@1"}, ACME, NotFoundError, "`helper@1` does not exist"),
    "another tenant's in a mixture": ({"model": "base", "adapters": [{"name": "acme-bot", "weight": 1},
                                        {"name": "helper", "weight": 1}]}, ACME, NotFoundError,
                                      "the model `helper` does not exist"),  # as sent, not its version
    "another tenant's, base-qualified": ({"model": "base:helper@prod"}, ACME, NotFoundError,
                                         "the model `base:helper@prod` does not exist"),
    "absent, base-qualified": ({"model": "base:acme-ghost"}, ACME, NotFoundError,
                               "the model `base:acme-ghost` does not exist"),
    "another tenant's route": ({"model": "split"}, ACME, NotFoundError, "the model `split` does not exist"),
    "mixture on an adapter": ({"model": "helper", "adapters": [{"name": "helper@1", "weight": 1}]}, EVERYONE,
                              InvalidAdapterError, "set `model` to the base model"),
    "merge alone": ({"model": "helper", "merge": {"strategy": "linear"}}, EVERYONE, InvalidAdapterError,
                    "needs the `adapters`"),
}


def _request(fields: dict) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **fields)


@pytest.mark.parametrize("name", list(OK))
def test_resolves(resolver, name):
    fields, who, (adapters, display, label, version) = OK[name]
    served = resolver.resolve(_request(fields), "user-1", who, add_merge=merged)
    assert (served.adapters, served.display, served.label, served.version) == (adapters, display, label, version)


@pytest.mark.parametrize("name", list(FAIL))
def test_refuses(resolver, name):
    fields, who, error, text = FAIL[name]
    with pytest.raises(error) as exc:
        resolver.resolve(_request(fields), "user-1", who, add_merge=merged)
    assert text in exc.value.message
    assert "file://" not in exc.value.message  # never the registry's location


def test_admin_loaded_names_resolve_until_removed(resolver, tmp_path):
    served = resolver.resolve(_request({"model": "mine"}), None, EVERYONE)
    assert served.display == "mine" and served.version == "local" and served.adapters[0][0].endswith("/mine")
    resolver.add_local("mine2", write_adapter(tmp_path / "m2"))
    assert "mine2" in resolver.listing()
    resolver.remove_local("mine2")
    with pytest.raises(NotFoundError):
        resolver.resolve(_request({"model": "mine2"}), None, EVERYONE)
    with pytest.raises(NotFoundError):
        resolver.remove_local("mine2")
    with pytest.raises(LoraplexError):
        resolver.add_local("Bad Name", write_adapter(tmp_path / "m3"))


# ---- tenant isolation ---------------------------------------------------------------------------------------

class Untouchable:
    """A registry (or route store) that fails the test when anything asks it anything."""

    def __getattr__(self, name):
        raise AssertionError(f"the registry was asked ({name}) for a name the key may not use")


FORBIDDEN = ["helper", "helper@1", "helper@prod", "helper@v2", "base:helper", f"{BASE}:helper@2", "split", "ghost",
             "ghost@3", "Bad..Name", "helper@1@2", "../etc"]


@pytest.mark.parametrize("asked", FORBIDDEN)
def test_forbidden_names_never_reach_the_registry(resolver, asked):
    blind = Resolver(Untouchable(), BASE, resolver.base_info, routes=Untouchable())
    for fields in ({"model": asked}, {"model": "base", "adapters": [{"name": "acme-bot"}, {"name": asked}]}):
        with pytest.raises(NotFoundError) as exc:
            blind.resolve(_request(fields), "user-1", ACME, add_merge=merged)
        assert exc.value.message == f"the model `{asked}` does not exist"
    with pytest.raises(NotFoundError):
        blind.target(asked, None, ACME)


@pytest.mark.parametrize("forbidden,absent", [("helper", "ghost"), ("helper@1", "ghost@1"), ("helper@prod", "ghost@prod"),
                                              ("base:helper", "base:ghost"), (f"{BASE}:helper@2", f"{BASE}:ghost@2"),
                                              ("split", "ghost"), ("helper@1", "acme-ghost@1"),
                                              ("helper", "acme-bot@9"), ("helper@prod", "acme-bot@nope")])
def test_forbidden_and_absent_are_the_same_404(resolver, forbidden, absent):
    """Another tenant's name and a name that does not exist (outside the key's patterns or inside them):
    the same error, word for word once the names are swapped."""
    def refusal(name, mixture):
        fields = {"model": "base", "adapters": [{"name": name}]} if mixture else {"model": name}
        with pytest.raises(LoraplexError) as exc:
            resolver.resolve(_request(fields), "user-1", ACME, add_merge=merged)
        return type(exc.value), exc.value.status, exc.value.message.replace(f"`{name}`", "`NAME`")

    for mixture in (False, True):
        assert refusal(forbidden, mixture) == refusal(absent, mixture) == \
            (NotFoundError, 404, "the model `NAME` does not exist")


class Counting:
    """A registry that counts the calls that reach it."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def counted(*a, **kw):
            self.calls.append(name)
            return attr(*a, **kw)
        return counted


def test_absent_names_are_remembered_briefly(resolver):
    registry = Counting(resolver.registry)
    r = Resolver(registry, BASE, resolver.base_info, ttl=5.0, negative_ttl=60.0)
    for asked in ("ghost", "ghost@3", "helper@9", "helper@nope"):
        for _ in range(3):
            with pytest.raises(NotFoundError):
                r.target(asked, None, EVERYONE)
    assert len(registry.calls) == 4, registry.calls  # once per absent name
    r.refresh()
    with pytest.raises(NotFoundError):
        r.target("ghost", None, EVERYONE)
    assert len(registry.calls) == 5
    assert Resolver(registry, BASE, None, ttl=0.0).negative_ttl == 0.0  # ttl 0: nothing is remembered
    assert Resolver(registry, BASE, None, ttl=30.0).negative_ttl <= 2.0  # short, whatever the ttl
    r.negative_ttl = 0.0  # expired: asked again
    with pytest.raises(NotFoundError):
        r.target("ghost", None, EVERYONE)
    assert len(registry.calls) == 6


def test_the_cache_is_bounded(resolver, monkeypatch):
    from loraplex.server.api import resolver as module

    monkeypatch.setattr(module, "MAX_CACHED", 8)
    r = Resolver(resolver.registry, BASE, resolver.base_info, ttl=60.0)
    for i in range(50):
        with pytest.raises(NotFoundError):
            r.target(f"ghost-{i}", None, EVERYONE)
    assert len(r._cache) == 8


class OneRoute:
    def __init__(self, name, *refs):
        self.route = Route(name, tuple(Arm(ref, int(ref.partition("@")[2]), 1.0) for ref in refs), "now", None, 1)

    def get(self, name):
        return self.route if name == self.route.name else None


def test_routes_are_authorized_by_their_name_and_their_arms(resolver):
    reg = resolver.registry
    info = resolver.base_info
    acme_route = Resolver(reg, BASE, info, routes=OneRoute("acme-split", "acme-bot@1"))
    assert acme_route.target("acme-split", "u", ACME).display == "acme-bot@1"  # name and arm are the key's
    route_only = Principal("s", frozenset({"inference"}), ("acme-split",))  # the route's name, not its arm's
    with pytest.raises(NotFoundError) as exc:
        acme_route.target("acme-split", "u", route_only)
    assert exc.value.message == "the model `acme-split` does not exist"
    across = Resolver(reg, BASE, info, routes=OneRoute("acme-split", "helper@1"))  # an arm outside the patterns
    with pytest.raises(NotFoundError) as exc:
        across.target("acme-split", "u", ACME)
    assert exc.value.message == "the model `acme-split` does not exist"
    gone = Resolver(reg, BASE, info, routes=OneRoute("acme-split", "acme-bot@7"))  # an arm whose version is gone
    with pytest.raises(NotFoundError) as exc:
        gone.target("acme-split", "u", ACME)
    assert exc.value.message == "the model `acme-split` does not exist"  # not the registry's location


def test_another_base_names_neither_version_nor_path(resolver):
    other = dataclasses.replace(resolver.base_info, num_hidden_layers=resolver.base_info.num_hidden_layers + 1)
    r = Resolver(resolver.registry, BASE, other)
    with pytest.raises(IncompatibleBaseError) as exc:
        r.resolve(_request({"model": "base:acme-bot"}), None, ACME)
    assert exc.value.message == f"the model `base:acme-bot` was made for a different base model, not {BASE}"
    with pytest.raises(NotFoundError):  # authorized first: another tenant's is still a 404
        r.resolve(_request({"model": "helper"}), None, ACME)
