"""Tenant isolation over HTTP, on the torch-free ScriptedBackend.

The matrix: every endpoint that takes a model or adapter name x (the key's own adapter, another tenant's,
one that does not exist): another tenant's and the absent one get the same status and the same body once
the name is swapped, and no body names the registry. Then the admin API under a tenant's patterns,
``/metrics`` behind its scope, the per-key concurrency limit, the key checked before the body is read, and
registry failures that reach a client without the registry's location.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from scripted_world import (ACME_ADMIN_KEY, ACME_KEY, ADMIN_KEY, LIMITED_KEY, METRICS_KEY, MSG, make_api, run,
                            world)  # noqa: F401  (the module fixture)

from loraplex.adapters.errors import IntegrityError, NotFoundError, StorageError
from loraplex.server.api import errors
from loraplex.server.api.app import RequestLimits

BASE = "tiny-llama"
OWN, FOREIGN, ABSENT = "own", "foreign", "absent"


@pytest.fixture(scope="module")
def tenants(world):  # noqa: F811
    """The world plus an alias on acme-bot, and one app whose operator loaded a folder as ``globex-local``."""
    world.registry.tag("acme-bot@1", "prod")
    api = make_api(world, keyed=True)

    async def load():
        async with api.client(ADMIN_KEY) as ops:
            r = await ops.post("/v1/load_lora_adapter", json={"lora_name": "globex-local",
                                                              "lora_path": str(world.folders["local"])})
            assert r.status_code == 200, r.text

    run(load())
    return world, api


# Each row: (endpoint, {case: the name asked}, request(name) -> (method, path, json body)).
# "foreign" names exist and belong to others (registry, alias, version, admin-loaded); "absent" names exist
# nowhere, outside the key's patterns or inside them.
NAMES = {
    "plain": {OWN: "acme-bot", FOREIGN: ["helper", "globex-local"], ABSENT: ["ghost", "acme-ghost"]},
    "version": {OWN: "acme-bot@1", FOREIGN: ["helper@1", "helper@2"], ABSENT: ["ghost@1", "acme-ghost@1", "acme-bot@9"]},
    "alias": {OWN: "acme-bot@prod", FOREIGN: ["helper@prod"], ABSENT: ["ghost@prod", "acme-bot@nope"]},
    "base-qualified": {OWN: "base:acme-bot", FOREIGN: ["base:helper", "base:globex-local"],
                       ABSENT: ["base:ghost", "base:acme-ghost"]},
    "base-id-qualified": {OWN: f"{BASE}:acme-bot@1", FOREIGN: [f"{BASE}:helper@2"], ABSENT: [f"{BASE}:ghost@2"]},
}


def _chat(name):
    return "POST", "/v1/chat/completions", {"model": name, "messages": MSG, "max_tokens": 2}


def _chat_stream(name):
    return "POST", "/v1/chat/completions", {"model": name, "messages": MSG, "max_tokens": 2, "stream": True}


def _completion(name):
    return "POST", "/v1/completions", {"model": name, "prompt": "x", "max_tokens": 2}


def _mixture(name):
    return "POST", "/v1/chat/completions", {"model": BASE, "messages": MSG, "max_tokens": 2,
                                            "adapters": [{"name": "acme-bot", "weight": 0.5}, {"name": name}]}


def _completion_mixture(name):
    return "POST", "/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 2,
                                       "adapters": [{"name": name, "weight": 0.5}, {"name": "acme-bot@1"}]}


def _merge(name):
    return "POST", "/v1/chat/completions", {"model": BASE, "messages": MSG, "max_tokens": 2, "merge": {"strategy": "ties"},
                                            "adapters": [{"name": "acme-bot"}, {"name": name}]}


def _pin(name):
    return "POST", f"/v1/adapters/{name}/pin", None


def _unpin(name):
    return "POST", f"/v1/adapters/{name}/unpin", None


def _tokenize(name):
    return "POST", "/tokenize", {"model": name, "prompt": "x"}


def _tokenize_chat(name):
    return "POST", "/tokenize", {"model": name, "messages": MSG}


def _detokenize(name):
    return "POST", "/detokenize", {"model": name, "tokens": [104, 105]}


ENDPOINTS = {"tokenize": _tokenize, "tokenize chat": _tokenize_chat, "detokenize": _detokenize, "chat": _chat, "chat stream": _chat_stream, "completion": _completion, "mixture member": _mixture,
             "completion mixture member": _completion_mixture, "merge member": _merge, "pin": _pin, "unpin": _unpin}
CASES = [(e, n) for e in ENDPOINTS for n in NAMES if not (e in ("pin", "unpin") and n.startswith("base"))]


async def _send(client, method, path, body):
    r = await client.request(method, path, json=body) if body is not None else await client.request(method, path)
    return r


def _same_answer(a, name_a, b, name_b):
    """Status, content type and body of two answers, equal once each answer's name is replaced by NAME."""
    def norm(r, name):
        return r.status_code, r.headers.get("content-type"), r.text.replace(name, "NAME")
    assert norm(a, name_a) == norm(b, name_b), (name_a, a.text, name_b, b.text)


def _says_nothing_of_the_registry(r, name, world):  # noqa: F811
    """No location, and no version the name resolved to (only the name as it was sent)."""
    text = r.text.replace(name, "NAME")
    for secret in ("file://", str(world.root), "s3://", "helper@", "acme-bot@", "globex-local", "registry"):
        assert secret not in text, (secret, r.text)


@pytest.mark.parametrize("endpoint,names", CASES, ids=[f"{e}-{n}" for e, n in CASES])
def test_matrix_another_tenants_is_absent(tenants, endpoint, names):
    world, api = tenants
    make = ENDPOINTS[endpoint]
    table = NAMES[names]

    async def main():
        async with api.client(ACME_ADMIN_KEY) as acme:
            own = await _send(acme, *make(table[OWN]))
            assert own.status_code == 200, own.text
            answers = [(n, await _send(acme, *make(n))) for n in table[FOREIGN] + table[ABSENT]]
        first_name, first = answers[0]
        assert first.status_code == 404 and first.json()["error"]["code"] == "model_not_found", first.text
        for name, r in answers:
            _same_answer(first, first_name, r, name)
            _says_nothing_of_the_registry(r, name, world)
            assert r.json()["error"]["message"] == f"the model `{name}` does not exist"

    run(main())


def test_matrix_model_listing_shows_neither(tenants):
    world, api = tenants

    async def main():
        async with api.client(ACME_ADMIN_KEY) as acme:
            ids = {m["id"] for m in (await acme.get("/v1/models")).json()["data"]}
        async with api.client(ADMIN_KEY) as ops:
            every = {m["id"] for m in (await ops.get("/v1/models")).json()["data"]}
        assert {BASE, "acme-bot", "acme-bot@1", "acme-bot@prod"} <= ids
        assert {"helper", "helper@1", "globex-local"} <= every
        assert ids == {i for i in every if i == BASE or i.startswith("acme-")}

    run(main())


# ---- the admin API under a tenant's patterns --------------------------------------------------------------

def test_tenant_admin_loads_and_unloads_only_its_names(tenants):
    world, api = tenants
    folder = str(world.folders["acme"])

    async def main():
        async with api.client(ACME_ADMIN_KEY) as acme:
            refused = {}
            for name in ("helper", "globex-local", "ghost", "globex-new"):  # taken by others, or free: the same
                r = await acme.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": folder})
                assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", r.text
                refused[name] = r
            first = next(iter(refused))
            for name, r in refused.items():
                _same_answer(refused[first], first, r, name)
            assert api.resolver.local == {"globex-local": str(world.folders["local"])}  # nothing shadowed
            ok = await acme.post("/v1/load_lora_adapter", json={"lora_name": "acme-local", "lora_path": folder})
            assert ok.status_code == 200 and api.resolver.local["acme-local"] == folder
            assert (await acme.post("/v1/completions", json=_completion("acme-local")[2])).status_code == 200
            gone = {n: await acme.post("/v1/unload_lora_adapter", json={"lora_name": n})
                    for n in ("globex-local", "ghost-local", "acme-ghost")}
            for name, r in gone.items():
                assert r.status_code == 404, r.text
                _same_answer(gone["globex-local"], "globex-local", r, name)
            assert "globex-local" in api.resolver.local
            assert (await acme.post("/v1/unload_lora_adapter", json={"lora_name": "acme-local"})).status_code == 200
            assert "acme-local" not in api.resolver.local

    run(main())


def test_tenant_admin_lists_only_its_adapters(tenants):
    world, api = tenants

    async def main():
        async with api.client(ADMIN_KEY) as ops:  # make the engine hold others' adapters and a merge
            for body in (_completion("helper@1")[2], _completion("globex-local")[2], _merge("helper")[2]):
                assert (await ops.post("/v1/completions" if "prompt" in body else "/v1/chat/completions",
                                       json=body)).status_code == 200
            every = {a["id"] for a in (await ops.get("/v1/adapters")).json()["data"]}
        async with api.client(ACME_ADMIN_KEY) as acme:
            await acme.post("/v1/adapters/acme-bot@1/pin")
            seen = {a["id"] for a in (await acme.get("/v1/adapters")).json()["data"]}
        assert {"helper@1", str(world.folders["local"]), "acme-bot@1"} <= every
        assert any(i.startswith("merge-") for i in every)
        assert seen == {"acme-bot@1"}, seen

    run(main())


def test_admin_scope_is_still_needed(tenants):
    world, api = tenants

    async def main():
        async with api.client(ACME_KEY) as acme:
            for method, path, body in (_pin("acme-bot@1"), ("GET", "/v1/adapters", None),
                                       ("POST", "/v1/unload_lora_adapter", {"lora_name": "acme-x"})):
                r = await _send(acme, method, path, body)
                assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", r.text

    run(main())


# ---- /metrics ----------------------------------------------------------------------------------------------

def test_metrics_need_the_metrics_scope(world):  # noqa: F811
    api = make_api(world, keyed=True)

    async def main():
        async with api.client(ACME_KEY) as acme:
            assert (await acme.post("/v1/completions", json=_completion("acme-bot")[2])).status_code == 200
        async with api.client() as anon:
            r = await anon.get("/metrics")
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        for key in (ACME_KEY, ADMIN_KEY, ACME_ADMIN_KEY):  # inference and admin are not enough
            async with api.client(key) as c:
                r = await c.get("/metrics")
                assert r.status_code == 403 and "'metrics' scope" in r.json()["error"]["message"], r.text
        async with api.client(METRICS_KEY) as scraper:
            r = await scraper.get("/metrics")
            assert r.status_code == 200 and 'adapter="acme-bot"' in r.text
            r = await scraper.post("/v1/completions", json=_completion(BASE)[2])  # metrics only: no inference
            assert r.status_code == 403

    run(main())


def test_metrics_open_by_the_operator_or_on_an_open_server(world):  # noqa: F811
    async def get(api):
        async with api.client() as anon:
            return await anon.get("/metrics")

    assert run(get(make_api(world, keyed=True, metrics_open=True))).status_code == 200
    assert run(get(make_api(world))).status_code == 200  # no keys at all: an open server
    assert run(get(make_api(world, keyed=True))).status_code == 401


def test_metrics_open_is_a_setting_and_a_flag(monkeypatch):
    import argparse

    from loraplex.server.api.settings import ServerSettings
    from loraplex.server.commands import _args_serve

    assert ServerSettings().metrics_open is False
    assert "metrics" in ServerSettings.model_fields["metrics_open"].description
    monkeypatch.setenv("LORAPLEX_METRICS_OPEN", "true")
    assert ServerSettings().metrics_open is True
    p = argparse.ArgumentParser()
    _args_serve(p)
    assert p.parse_args(["--metrics-open"]).metrics_open is True and p.parse_args([]).metrics_open is None


# ---- per-key concurrency -----------------------------------------------------------------------------------

def test_a_key_past_its_max_concurrent_gets_429(world):  # noqa: F811
    api = make_api(world, keyed=True, kv_slots_total=8, token_delay=0.05)  # (0.5 s a request: the 4 overlap)
    admission = api.app.state.api.admission

    async def main():
        body = _completion("acme-bot")[2] | {"max_tokens": 10}
        async with api.client(LIMITED_KEY) as limited, api.client(ACME_KEY) as other:
            results = await asyncio.gather(*(limited.post("/v1/completions", json=body) for _ in range(4)),
                                           other.post("/v1/completions", json=body),
                                           other.post("/v1/completions", json=body))
            codes = [r.status_code for r in results]
            assert sorted(codes[:4]) == [200, 200, 429, 429] and codes[4:] == [200, 200], codes
            for r in results[:4]:
                if r.status_code == 429:
                    assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
                    assert "'acme-limited'" in r.json()["error"]["message"] and "2 concurrent" in r.json()["error"]["message"]
            many = await limited.post("/v1/completions", json=body | {"prompt": ["a", "b", "c"]})
            assert many.status_code == 429  # three prompts are three generations
            # a stream holds its place until it ends
            stream = asyncio.create_task(limited.post("/v1/completions", json=body | {"stream": True}))
            for _ in range(200):
                if admission.held_by("acme-limited"):
                    break
                await asyncio.sleep(0.005)
            assert admission.held_by("acme-limited") == 1 and not stream.done()
            r = await stream
            assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
            assert admission.held_by("acme-limited") == 0
            assert (await limited.post("/v1/completions", json=body)).status_code == 200
        assert admission.held_by("acme-limited") == 0 and admission.outstanding == 0
        metrics = api.metrics.render()[0].decode()
        rejected = [float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("loraplex_requests_total{") and 'outcome="rejected"' in line]
        assert sum(rejected) == 3, rejected  # under acme-bot, or `other` when refused before resolution
        assert 'loraplex_requests_total{adapter="other",outcome="rejected",version=""} 1.0' in metrics  # the 3 prompts

    run(main())


# ---- the key before the body; errors without the registry's location ----------------------------------------

def test_the_key_is_checked_before_the_body_is_read(world):  # noqa: F811
    api = make_api(world, keyed=True, limits=RequestLimits(max_body_bytes=4096))

    async def main():
        async with api.client() as anon:
            for path, raw in (("/v1/chat/completions", b"{not json"), ("/v1/completions", b'{"model": 5}'),
                              ("/v1/completions", b"{" + b" " * 10_000 + b"}"), ("/v1/no-such-path", b"{}")):
                r = await anon.post(path, content=raw, headers={"content-type": "application/json"})
                assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", (path, r.text)
            for path in ("/health", "/ready", "/openapi.json"):
                assert (await anon.get(path)).status_code == 200
        async with api.client(ACME_KEY) as acme:
            r = await acme.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
            assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]

    run(main())


class Failing:
    """A registry whose every read fails as ``exc``."""

    def __init__(self, exc):
        self.exc = exc

    def __getattr__(self, name):
        def fail(*a, **kw):
            raise self.exc
        return fail


@pytest.mark.parametrize("exc,status,message", [
    (StorageError("cannot reach S3 at http://10.1.2.3:8333: connection refused"), 503, errors.STORAGE_MESSAGE),
    (StorageError("S3 bucket 'tenant-bucket' does not exist at http://10.1.2.3:8333"), 503, errors.STORAGE_MESSAGE),
    (IntegrityError("manifest /var/cache/loraplex/acme-bot/1/manifest.json is corrupt"), 500, errors.INTEGRITY_MESSAGE),
])
def test_registry_failures_do_not_locate_the_registry(world, exc, status, message):  # noqa: F811
    api = make_api(world, keyed=True)
    api.resolver.registry = Failing(exc)

    async def main():
        async with api.client(ACME_KEY) as acme:
            r = await acme.post("/v1/completions", json=_completion("acme-bot")[2])
            assert (r.status_code, r.json()["error"]["message"]) == (status, message), r.text
            for secret in ("10.1.2.3", "tenant-bucket", "/var/cache"):
                assert secret not in r.text
            forbidden = await acme.post("/v1/completions", json=_completion("helper")[2])
            assert forbidden.status_code == 404  # never asked the registry
            base = await acme.post("/v1/completions", json=_completion(BASE)[2])
            assert base.status_code == 200  # the base model does not need the registry

    run(main())


def test_no_envelope_carries_a_uri():
    for exc in (NotFoundError("adapter 'x' not found in s3://bucket/prefix?endpoint_url=http://h:9000"),
                NotFoundError("adapter 'x' not found in file:///srv/registry"), ValueError("bad http://h/x\nmore")):
        body = json.loads(errors.from_exception(exc).body)["error"]["message"]
        assert "://" not in body and "bucket" not in body and "/srv" not in body, body
