"""The OpenAI-compatible API in process, over the torch-free ScriptedBackend: response shapes, model
resolution, mixtures and merges, error envelopes, admission (429), API keys, the admin API, metrics."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import openai
import pytest
from scripted_world import ACME_KEY, ADMIN_KEY, MSG, make_api, run, world  # noqa: F401  (the module fixture)

from loraplex.server.api.app import RequestLimits

BASE = "tiny-llama"


@pytest.fixture
def api(world):  # noqa: F811
    return make_api(world)


def test_chat_completion_shape(api):
    async def main():
        r = await api.openai().chat.completions.create(model=BASE, messages=MSG, max_tokens=5, temperature=0)
        assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == BASE
        assert r.choices[0].message.role == "assistant" and len(r.choices[0].message.content) == 5
        assert r.choices[0].finish_reason == "length"
        prompt = api.backend.chat_prompt(MSG)
        assert r.usage.prompt_tokens == len(prompt.encode()) and r.usage.completion_tokens == 5
        assert r.usage.total_tokens == r.usage.prompt_tokens + 5

    run(main())


def test_completions_resolve_versions_and_differ_by_adapter(api):
    async def main():
        c = api.openai()
        outs = {m: await c.completions.create(model=m, prompt="hello", max_tokens=12, temperature=0)
                for m in ("base", "helper", "helper@1", "helper@prod", f"{BASE}:helper@2")}
        assert {m: o.model for m, o in outs.items()} == {"base": BASE, "helper": "helper@2", "helper@1": "helper@1",
                                                       "helper@prod": "helper@1", f"{BASE}:helper@2": "helper@2"}
        texts = {o.model: o.choices[0].text for o in outs.values()}
        assert len(set(texts.values())) == 3  # base, helper@1 and helper@2 write differently
        again = await c.completions.create(model="helper@1", prompt="hello", max_tokens=12, temperature=0)
        assert again.choices[0].text == texts["helper@1"]  # deterministic
        many = await c.completions.create(model="helper", prompt=["ab", "cde"], max_tokens=3, temperature=0)
        assert [ch.index for ch in many.choices] == [0, 1]
        assert many.usage.prompt_tokens == 5 and many.usage.completion_tokens == 6
        raw = await c.completions.with_raw_response.create(model="helper@prod", prompt="x", max_tokens=1)
        assert raw.headers["x-loraplex-adapter"] == "helper@1"

    run(main())


def test_stop_strings_eos_and_logprobs(world):  # noqa: F811
    api = make_api(world, eos_after=4)

    async def main():
        c = api.openai()
        whole = await c.completions.create(model="helper@1", prompt="hi", max_tokens=30, temperature=0,
                                           extra_body={"ignore_eos": True})
        text = whole.choices[0].text
        assert len(text) == 30 and whole.choices[0].finish_reason == "length"
        stop = text[5:7]
        cut = await c.completions.create(model="helper@1", prompt="hi", max_tokens=30, temperature=0, stop=[stop],
                                         extra_body={"ignore_eos": True})
        assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[:text.index(stop)]
        eos = await c.completions.create(model="helper@1", prompt="hi", max_tokens=30, temperature=0)
        assert eos.choices[0].finish_reason == "stop" and eos.choices[0].text == text[:4]
        assert eos.usage.completion_tokens == 5  # the EOS token counts, its text does not
        r = await c.chat.completions.create(model=BASE, messages=MSG, max_tokens=3, temperature=0, logprobs=True,
                                            top_logprobs=2)
        content = r.choices[0].logprobs.content
        assert len(content) == 3 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
        assert "".join(t.token for t in content) == r.choices[0].message.content
        assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)
        lp = await c.completions.create(model=BASE, prompt="hi", max_tokens=2, logprobs=1, temperature=0)
        assert len(lp.choices[0].logprobs.tokens) == 2 and len(lp.choices[0].logprobs.top_logprobs[0]) == 1

    run(main())


def test_mixture_and_merge(api):
    async def main():
        c = api.openai()
        mix = [{"name": "helper@1", "weight": 0.7}, {"name": "acme-bot", "weight": 0.3}]
        m = await c.chat.completions.create(model=BASE, messages=MSG, max_tokens=6, temperature=0,
                                            extra_body={"adapters": mix})
        assert m.model == "helper@1*0.7+acme-bot@1*0.3"
        merged = await c.chat.completions.create(model=BASE, messages=MSG, max_tokens=6, temperature=0,
                                                 extra_body={"adapters": mix, "merge": {"strategy": "ties"}})
        assert merged.model.startswith("merge-") and merged.model in api.backend.merges
        assert api.backend.merges[merged.model][0] == ["helper@1", "acme-bot@1"]
        assert merged.choices[0].message.content != m.choices[0].message.content

    run(main())


def test_error_envelopes(api):
    async def main():
        async with api.client() as c:
            cases = [(b"{not json", "not valid JSON"), (json.dumps({"model": BASE, "messages": []}), "messages"),
                     (json.dumps({"model": BASE, "messages": MSG, "temperature": 5}), "temperature"),
                     (json.dumps({"model": "helper", "messages": MSG, "adapters": [{"name": "helper"}]}), "base model"),
                     (json.dumps({"model": BASE, "messages": MSG, "merge": {"strategy": "ties"}}), "adapters")]
            for raw, needle in cases:
                r = await c.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
                err = r.json()["error"]
                assert r.status_code == 400 and set(err) == {"message", "type", "param", "code"}, r.text
                assert needle in err["message"] and err["type"] == "invalid_request_error"
            long = {"model": BASE, "prompt": "x" * 600, "max_tokens": 2}
            r = await c.post("/v1/completions", json=long)
            assert r.status_code == 400 and "tokens" in r.json()["error"]["message"]
            r = await c.post("/v1/completions", content=b"{" + b" " * (2 << 20) + b"}",
                             headers={"content-type": "application/json"})
            assert r.status_code == 413
        with pytest.raises(openai.NotFoundError) as e:
            await api.openai().chat.completions.create(model="ghost", messages=MSG, max_tokens=1)
        assert e.value.body["type"] == "not_found_error" and e.value.body["code"] == "model_not_found"

    run(main())


def test_engine_error_mid_generation_is_a_500_envelope(world):  # noqa: F811
    api = make_api(world, broken=frozenset({"helper@1"}))

    async def main():
        async with api.client() as c:
            r = await c.post("/v1/completions", json={"model": "helper@1", "prompt": "x", "max_tokens": 3})
        assert r.status_code == 500 and "failed in the engine" in r.json()["error"]["message"]

    run(main())


def test_full_admission_is_429_and_tickets_come_back(world):  # noqa: F811
    api = make_api(world, limits=RequestLimits(max_queue=1), kv_slots_total=1, token_delay=0.02)

    async def main():
        async with api.client() as c:
            body = {"model": "helper@1", "prompt": "x", "max_tokens": 10}
            results = await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(4)))
            codes = sorted(r.status_code for r in results)
            assert codes == [200, 200, 429, 429], codes
            rejected = [r for r in results if r.status_code == 429]
            assert all(r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
                       for r in rejected)
            over = await c.post("/v1/completions", json={**body, "prompt": ["a", "b", "c"]})
            assert over.status_code == 429  # three prompts need three places
            assert (await c.post("/v1/completions", json=body)).status_code == 200
            assert 'outcome="rejected"' in (await c.get("/metrics")).text
        assert api.app.state.api.admission.outstanding == 0

    run(main())


def test_api_keys_scopes_and_tenants(world):  # noqa: F811
    api = make_api(world, keyed=True)

    async def main():
        async with api.client() as anon:
            r = await anon.post("/v1/chat/completions", json={"model": BASE, "messages": MSG})
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["type"] == "authentication_error"
            assert (await anon.get("/health")).status_code == 200
        async with api.client(ACME_KEY) as acme:
            ok = await acme.post("/v1/completions", json={"model": "acme-bot", "prompt": "x", "max_tokens": 1})
            assert ok.status_code == 200 and ok.json()["model"] == "acme-bot@1"
            for body in ({"model": "helper@1"}, {"model": BASE, "adapters": [{"name": "helper"}]}):
                r = await acme.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, **body})
                assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            ids = {m["id"] for m in (await acme.get("/v1/models")).json()["data"]}
            assert BASE in ids and "acme-bot@1" in ids and not any(i.startswith("helper") for i in ids)
            r = await acme.post("/v1/admin/refresh")
            assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        async with api.client(ADMIN_KEY) as ops:
            assert (await ops.post("/v1/admin/refresh")).json() == {"refreshed": True}
        with pytest.raises(openai.AuthenticationError):
            await api.openai("not-a-real-key-at-all").models.list()

    run(main())


def test_admin_load_unload_pin_and_models(api, world):  # noqa: F811
    async def main():
        async with api.client() as c:
            folder = str(world.folders["local"])
            r = await c.post("/v1/load_lora_adapter", json={"lora_name": "local-one", "lora_path": folder})
            assert r.status_code == 200 and "added" in r.text
            assert api.resolver.local == {"local-one": folder}
            out = await c.post("/v1/completions", json={"model": "local-one", "prompt": "x", "max_tokens": 2})
            assert out.json()["model"] == "local-one"
            assert "local-one" in {m["id"] for m in (await c.get("/v1/models")).json()["data"]}
            bad = await c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(world.root / "nope")})
            assert bad.status_code == 400 and "does not exist" in bad.json()["error"]["message"]
            assert "x" not in api.resolver.local
            assert (await c.post("/v1/adapters/helper@2/pin")).json() == {"id": "helper@2", "pinned": True}
            status = {a["id"]: a for a in (await c.get("/v1/adapters")).json()["data"]}
            assert status["helper@2"]["pinned"] is True and status[folder]["tier"] == "device"
            assert (await c.post("/v1/adapters/helper@2/unpin")).json()["pinned"] is False
            assert (await c.post("/v1/unload_lora_adapter", json={"lora_name": "local-one"})).status_code == 200
            gone = await c.post("/v1/unload_lora_adapter", json={"lora_name": "local-one"})
            assert gone.status_code == 404
            r = await c.post("/v1/completions", json={"model": "local-one", "prompt": "x", "max_tokens": 1})
            assert r.status_code == 404
            models = (await c.get("/v1/models")).json()["data"]
            assert models[0] == {**models[0], "id": BASE, "parent": None}
            assert {"helper", "helper@1", "helper@2", "helper@prod", "acme-bot"} <= {m["id"] for m in models}
            text = (await c.get("/metrics")).text
            assert 'loraplex_requests_total{adapter="local-one",outcome="ok",version="local"}' in text
            assert "loraplex_kv_slots_total 4.0" in text and (await c.get("/ready")).json()["model"] == BASE

    run(main())


def test_the_api_and_scripted_backend_never_import_torch():
    """A whole request, streamed and not, through the app in a fresh interpreter: no torch stack loaded."""
    code = """
import asyncio, sys
import httpx
from loraplex.server.api.app import create_app
from loraplex.server.api.auth import KeyStore
from loraplex.server.api.metrics import Metrics
from loraplex.server.api.resolver import Resolver
from loraplex.server.api.scripted import ScriptedBackend

app = create_app(ScriptedBackend("b"), Resolver(None, "b", None), keys=KeyStore.open(), metrics=Metrics())

async def main():
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as c:
        body = {"model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        assert (await c.post("/v1/chat/completions", json=body)).status_code == 200
        streamed = await c.post("/v1/chat/completions", json={**body, "stream": True})
        assert streamed.text.endswith("data: [DONE]\\n\\n"), streamed.text
        assert (await c.get("/metrics")).status_code == 200

asyncio.run(main())
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "safetensors", "vllm"))
assert "torch" not in sys.modules and not heavy, heavy
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
