"""The server's guards, live: API keys with scopes and tenant isolation, overload (429), timeouts."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import yaml

from loraplex.server.api.auth import hash_key
from loraplex.server.api.errors import STORAGE_MESSAGE
from server_fixtures import LiveServer
from test_server import BASE, MSG, settings, world  # noqa: F401  (the module fixture)

INFER_KEY = "acme-inference-key-0001"
ADMIN_KEY = "ops-admin-key-000000001"
OTHER_KEY = "globex-inference-key-01"


@pytest.fixture(scope="module")
def keyed(world, tmp_path_factory):  # noqa: F811
    keyfile = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keyfile.write_text(yaml.safe_dump({"keys": [
        {"name": "acme", "key_sha256": hash_key(INFER_KEY), "scopes": ["inference"], "adapters": ["acme-*"]},
        {"name": "globex", "key": OTHER_KEY, "scopes": ["inference"], "adapters": ["helper", "other"]},
        {"name": "ops", "key": ADMIN_KEY, "scopes": ["inference", "admin"]},
    ]}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPLEX_HOME", str(world["root"] / "home"))
        s = LiveServer(settings(world, api_keys_file=keyfile))
        yield s
        s.stop()


def client(server, key):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def test_missing_or_wrong_key_is_401(keyed):
    r = httpx.post(keyed.url + "/v1/chat/completions", json={"model": BASE, "messages": MSG})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert r.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError) as e:
        client(keyed, "not-a-real-key-at-all").chat.completions.create(model=BASE, messages=MSG, max_tokens=1)
    assert "not-a-real-key" not in str(e.value.body)
    ok = httpx.post(keyed.url + "/v1/completions", json={"model": BASE, "prompt": "w3", "max_tokens": 1},
                    headers={"x-api-key": ADMIN_KEY})
    assert ok.status_code == 200


def test_scopes_guard_the_admin_api(keyed):
    r = httpx.post(keyed.url + "/v1/admin/refresh", headers={"authorization": f"Bearer {INFER_KEY}"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    r = httpx.post(keyed.url + "/v1/admin/refresh", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200


def test_tenant_isolation_is_a_404(keyed):
    acme, globex = client(keyed, INFER_KEY), client(keyed, OTHER_KEY)
    assert acme.completions.create(model="acme-bot", prompt="w3", max_tokens=1).model == "acme-bot@1"
    with pytest.raises(openai.NotFoundError):
        acme.completions.create(model="helper", prompt="w3", max_tokens=1)
    with pytest.raises(openai.NotFoundError):
        globex.completions.create(model="acme-bot@1", prompt="w3", max_tokens=1)
    with pytest.raises(openai.NotFoundError):  # not through a mixture either
        globex.completions.create(model=BASE, prompt="w3", max_tokens=1, extra_body={"adapters": [{"name": "acme-bot"}]})
    ids = {m.id for m in acme.models.list().data}
    assert "acme-bot" in ids and "helper" not in ids and BASE in ids
    assert {m.id for m in globex.models.list().data} >= {"helper", "other"}


def test_two_keys_on_one_adapter_never_share_cached_prefixes(keyed):
    """The prefix cache is salted per API key (on both engines): a tenant cannot learn from a fast first token,
    nor from cached_tokens, that another tenant sent the same prompt to a shared adapter."""
    ops, globex = client(keyed, ADMIN_KEY), client(keyed, OTHER_KEY)
    prompt = " ".join(f"w{(i * 37) % 110 + 10}" for i in range(200))

    def cached(who):
        r = who.completions.create(model="helper@1", prompt=prompt, max_tokens=2, temperature=0)
        return r.usage.prompt_tokens_details.cached_tokens

    assert cached(ops) == 0
    assert cached(ops) >= 16  # its own repeat is a hit
    assert cached(globex) == 0  # the other key's cache is not its own
    assert cached(globex) >= 16


def test_metrics_need_a_key_with_the_metrics_scope(keyed):
    assert httpx.get(keyed.url + "/metrics").status_code == 401
    r = httpx.get(keyed.url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 403 and "'metrics' scope" in r.json()["error"]["message"]


@pytest.fixture(scope="module")
def guarded(world):  # noqa: F811
    """One request at a time, two queued, and a registry that is down (the base model needs none): one server
    start for the overload and registry-down tests."""
    from ports import free_port

    closed = free_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPLEX_HOME", str(world["root"] / "home"))
        mp.setenv("AWS_ACCESS_KEY_ID", "x")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "y")
        cfg = settings(world, max_running=1, max_queue=2).model_copy(
            update={"registry": f"s3://down/r?endpoint_url=http://127.0.0.1:{closed}&region=us-east-1"})
        s = LiveServer(cfg)
        s.closed_port = closed
        yield s
        s.stop()


def test_overload_answers_429_with_retry_after(guarded):
    s = guarded

    async def main():
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
            body = {"model": BASE, "prompt": "w3 w4", "max_tokens": 60, "ignore_eos": True}
            return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(12)))

    results = asyncio.run(main())
    codes = [r.status_code for r in results]
    assert 429 in codes and 200 in codes, codes
    rejected = [r for r in results if r.status_code == 429]
    assert all(r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error" for r in rejected)
    assert 'outcome="rejected"' in httpx.get(s.url + "/metrics").text


def test_request_timeout_is_504(world):  # noqa: F811
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPLEX_HOME", str(world["root"] / "home"))
        s = LiveServer(settings(world, request_timeout=0.05))
    try:
        body = {"model": BASE, "prompt": "w3", "max_tokens": 250, "ignore_eos": True}
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error", r.text
        for _ in range(100):  # the timed-out generation was aborted, not left running
            if s.backend.stats()["running"] == 0:
                break
            import time
            time.sleep(0.02)
        assert s.backend.stats()["running"] == 0
    finally:
        s.stop()


def test_adapter_for_another_base_is_refused(world, keyed, tmp_path):  # noqa: F811
    """An adapter pushed for a 3-layer base is a clear 400 on this 2-layer server, not a crash (on the keyed
    server, as its operator: no server of its own to start)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from server_fixtures import TINY

    other = tmp_path / "other-base"
    LlamaForCausalLM(LlamaConfig(**{**TINY, **world["dims"], "num_hidden_layers": 3})).save_pretrained(other)
    from engine_fixtures import make_peft_adapters

    folders = make_peft_adapters(tmp_path / "peft3", specs={"x": dict(r=4, lora_alpha=8, target_modules=["q_proj"])},
                                 dims=world["dims"])
    # re-save the adapter's tensors for a 3-layer model by pushing with the 3-layer base's shapes
    world["registry"].push(folders["x"], "foreign", base_model=str(other))
    r = httpx.post(keyed.url + "/v1/completions", json={"model": "foreign", "prompt": "w3", "max_tokens": 1},
                   headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 400 and "made for a different base model" in r.json()["error"]["message"], r.text
    assert str(other) not in r.text and "foreign@" not in r.text  # neither the pusher's path nor the version


def test_registry_down_is_a_503(guarded):
    s, closed = guarded, guarded.closed_port
    r = httpx.post(s.url + "/v1/completions", json={"model": "helper", "prompt": "w3", "max_tokens": 1}, timeout=120)
    assert r.status_code == 503 and r.json()["error"]["message"] == STORAGE_MESSAGE, r.text
    assert f"127.0.0.1:{closed}" not in r.text and "s3://" not in r.text and "down" not in r.text
    ok = httpx.post(s.url + "/v1/completions", json={"model": BASE, "prompt": "w3", "max_tokens": 1})
    assert ok.status_code == 200  # the base model keeps serving
