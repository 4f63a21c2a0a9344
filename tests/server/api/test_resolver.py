"""Resolver.resolve as a table: a request's ``model`` / ``adapters`` / ``merge`` and a key in, what the engine
serves (or the error) out. A real folder registry of tiny adapters (numpy; no torch): helper@1 (alias prod),
helper@2, acme-bot@1; the route ``split`` sends every user to helper@1; ``mine`` is admin-loaded."""

from __future__ import annotations

import pytest
from adapter_factory import write_adapter, write_base_config

from loraplex.adapters import AdapterCache, AdapterRegistry
from loraplex.adapters.basemodel import resolve_base_model
from loraplex.adapters.errors import InvalidAdapterError, LoraplexError, NotFoundError
from loraplex.adapters.routes import RouteStore
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
                                        {"name": "helper", "weight": 1}]}, ACME, NotFoundError, "does not exist"),
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
