"""The OpenAI-compatible API in process, over the torch-free ScriptedBackend: response shapes, model
resolution, mixtures and merges, error envelopes, admission (429), API keys, the admin API, metrics."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import openai
import pytest
from scripted_world import ACME_KEY, ADMIN_KEY, LIMITED_KEY, MSG, make_api, run, world  # noqa: F401  (the module fixture)

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


def test_tokenize_and_detokenize_with_vllms_shapes(api):
    """/tokenize (a prompt, or chat messages through the template) and /detokenize at the server's root, as vLLM
    serves them; ``model`` may name an adapter (same tokenizer); bad ids and bad bodies are 400s."""
    async def main():
        root = api.openai().with_options(base_url="http://api")
        r = await root.post("/tokenize", body={"model": "helper@1", "prompt": "héllo", "return_token_strs": True},
                            cast_to=object)
        ids = list("héllo".encode())
        assert r == {"count": len(ids), "max_model_len": api.backend.max_model_len, "tokens": ids,
                     "token_strs": [chr(i) for i in ids]}
        r = await root.post("/tokenize", body={"prompt": "ab"}, cast_to=object)  # model is optional
        assert r["tokens"] == [97, 98] and "token_strs" not in r
        chat = await root.post("/tokenize", body={"model": BASE, "messages": MSG}, cast_to=object)
        assert chat["tokens"] == list(api.backend.chat_prompt(MSG).encode())
        open_end = await root.post("/tokenize", body={"messages": MSG, "add_generation_prompt": False},
                                   cast_to=object)
        assert bytes(open_end["tokens"]).decode() + "<|assistant|>" == api.backend.chat_prompt(MSG)
        back = await root.post("/detokenize", body={"model": "helper", "tokens": ids}, cast_to=object)
        assert back == {"prompt": "héllo"}
        for path, body, says in (("/detokenize", {"tokens": [104, 300]}, "token id 300"),
                                 ("/detokenize", {"tokens": [-1]}, "tokens"),
                                 ("/tokenize", {"prompt": 5}, "prompt"),
                                 ("/tokenize", {}, "prompt"),
                                 ("/tokenize", {"messages": MSG, "continue_final_message": True},
                                  "continue_final_message"),
                                 ("/tokenize", {"messages": MSG, "add_generation_prompt": False,
                                                "continue_final_message": True}, "assistant")):
            with pytest.raises(openai.BadRequestError) as e:
                await root.post(path, body=body, cast_to=object)
            assert e.value.status_code == 400 and says in e.value.message, (path, body, e.value.message)
        with pytest.raises(openai.NotFoundError):
            await root.post("/tokenize", body={"model": "ghost", "prompt": "x"}, cast_to=object)

    run(main())


@pytest.mark.parametrize("field, value", [
    ("response_format", {"type": "json_object"}), ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("tool_choice", "required"), ("structured_outputs", {"json": {}}),
    ("guided_json", {"type": "object"}), ("use_beam_search", True), ("min_tokens", 3),
    ("chat_template", "{{ messages }}"), ("chat_template_kwargs", {"x": 1}), ("echo", True), ("store", True),
    ("modalities", ["text", "audio"]), ("bad_words", ["x"]), ("skip_special_tokens", False)])
def test_a_schema_field_not_served_is_a_400_naming_it(api, field, value):
    """Never silently ignored: OpenAI's and vLLM's fields that loraplex does not serve are refused, naming the
    field, unless they are sent with the value that asks for nothing; unknown fields are ignored (OpenAI's way)."""
    async def main():
        c = api.openai()
        with pytest.raises(openai.BadRequestError) as e:
            await c.chat.completions.create(model=BASE, messages=MSG, max_tokens=2, extra_body={field: value})
        assert e.value.body["param"] == field and f"`{field}` is not supported" in e.value.body["message"]

    run(main())


def test_neutral_values_of_unserved_fields_and_unknown_fields_pass(api):
    async def main():
        c = api.openai()
        r = await c.chat.completions.create(
            model=BASE, messages=MSG, max_tokens=2, temperature=0, response_format={"type": "text"}, tools=[],
            tool_choice="none", parallel_tool_calls=False, metadata={"k": "v"}, store=False, service_tier="auto",
            logit_bias={}, extra_body={"use_beam_search": False, "min_tokens": 0, "length_penalty": 1.0,
                                       "skip_special_tokens": True, "a_field_nobody_defined": {"x": 1}})
        assert r.choices[0].message.content
        for field, value in (("suffix", "tail"), ("best_of", 2), ("tools", [{}])):
            if field == "tools":  # (a chat field: in a completion body it is simply unknown)
                r = await c.completions.create(model=BASE, prompt="x", max_tokens=1, extra_body={field: value})
                assert r.choices[0].text is not None
                continue
            with pytest.raises(openai.BadRequestError) as e:
                await c.completions.create(model=BASE, prompt="x", max_tokens=1, extra_body={field: value})
            assert e.value.body["param"] == field
        with pytest.raises(openai.BadRequestError, match="length_penalty"):  # 1 and 1.0 pass; True is not 1
            await c.chat.completions.create(model=BASE, messages=MSG, max_tokens=2,
                                            extra_body={"length_penalty": True})

    run(main())


def test_logit_bias_forces_and_bans_tokens(api):
    """OpenAI's logit_bias: +100 on a token makes greedy decoding pick it, -100 bans the token it would pick;
    ids outside the vocabulary, keys that are not ids, biases outside [-100, 100] and too many entries are 400s."""
    async def main():
        c = api.openai()
        plain = await c.completions.create(model="helper", prompt="hello", max_tokens=8, temperature=0)
        forced = await c.completions.create(model="helper", prompt="hello", max_tokens=8, temperature=0,
                                            logit_bias={str(ord("q")): 100})
        assert forced.choices[0].text == "q" * 8 != plain.choices[0].text
        first = plain.choices[0].text[0]
        banned = await c.completions.create(model="helper", prompt="hello", max_tokens=1, temperature=0,
                                            logit_bias={str(ord(first)): -100})
        assert banned.choices[0].text != first
        chat = await c.chat.completions.create(model=BASE, messages=MSG, max_tokens=3, temperature=0,
                                               logit_bias={str(ord("z")): 100})
        assert chat.choices[0].message.content == "zzz"
        for bias, says in (({"300": 5}, "logit_bias token ids"), ({"abc": 5}, "token ids"), ({"-1": 5}, "token ids"),
                           ({"5": 101}, "logit_bias"),
                           ({"7": 1, "07": 2}, "distinct"), ({str(i): 1 for i in range(1025)}, "logit_bias")):
            with pytest.raises(openai.BadRequestError) as e:
                await c.completions.create(model=BASE, prompt="x", max_tokens=1, logit_bias=bias)
            assert says in e.value.message, (bias if len(bias) < 5 else len(bias), e.value.message)
        async with api.client() as raw:  # (the openai client refuses to send NaN)
            r = await raw.post("/v1/completions", content=b'{"model": "base", "prompt": "x", "logit_bias": {"5": NaN}}',
                               headers={"content-type": "application/json"})
            assert r.status_code == 400 and "logit_bias" in r.json()["error"]["message"]

    run(main())


def test_n_choices_seeded_streamed_and_counted(api):
    """n choices of one prompt: seeded choices differ from each other and repeat exactly; greedy ones agree; the
    stream carries every choice under its index (the same texts as the whole body); usage counts the prompt once;
    completions order prompt p's choice i at p * n + i; choice 0 starts first (its prompt then cached)."""
    async def main():
        c = api.openai()
        kw = dict(model="helper", messages=MSG, max_tokens=6, temperature=0.9, seed=11, n=3)
        r = await c.chat.completions.create(**kw)
        texts = [ch.message.content for ch in r.choices]
        assert [ch.index for ch in r.choices] == [0, 1, 2] and len(set(texts)) == 3
        assert [ch.message.content for ch in (await c.chat.completions.create(**kw)).choices] == texts
        one = await c.chat.completions.create(**{**kw, "n": 1})
        assert one.choices[0].message.content == texts[0]  # choice 0 samples with the request's own seed
        assert r.usage.prompt_tokens == one.usage.prompt_tokens and r.usage.completion_tokens == 18
        started = len(api.backend.started)
        streamed: dict[int, str] = {}
        last = None
        async for chunk in await c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
            for ch in chunk.choices:
                streamed[ch.index] = streamed.get(ch.index, "") + (ch.delta.content or "")
            last = chunk
        assert [streamed[i] for i in range(3)] == texts and last.usage.completion_tokens == 18
        assert api.backend.started[started].endswith("-0")
        greedy = await c.chat.completions.create(model=BASE, messages=MSG, max_tokens=4, temperature=0, n=2)
        assert greedy.choices[0].message.content == greedy.choices[1].message.content
        comp = await c.completions.create(model=BASE, prompt=["ab", "cd"], max_tokens=3, temperature=0.5, seed=1, n=2)
        assert [ch.index for ch in comp.choices] == [0, 1, 2, 3]
        alone = await c.completions.create(model=BASE, prompt="cd", max_tokens=3, temperature=0.5, seed=1)
        assert comp.choices[2].text == alone.choices[0].text and comp.usage.prompt_tokens == 4
        with pytest.raises(openai.BadRequestError, match="n"):
            await c.chat.completions.create(model=BASE, messages=MSG, max_tokens=1, n=17)

    run(main())


def test_n_choices_count_against_a_keys_concurrency(world):  # noqa: F811
    api = make_api(world, keyed=True)

    async def main():
        c = api.openai(LIMITED_KEY)  # at most 2 generations in flight
        with pytest.raises(openai.RateLimitError):
            await c.chat.completions.create(model="acme-bot", messages=MSG, max_tokens=1, n=3)
        r = await c.chat.completions.create(model="acme-bot", messages=MSG, max_tokens=1, n=2)
        assert len(r.choices) == 2

    run(main())


def test_echo_scores_the_prompt_as_openai_and_vllm_do(api):
    """echo + logprobs + max_tokens 0 (what lm-evaluation-harness sends to score text): the prompt comes back
    with each token's logprob, the first null; max_tokens 1 adds the generated token after it; vLLM's
    prompt_logprobs gives the same numbers per token id with ranks; a prompt given as ids echoes their text."""
    async def main():
        c = api.openai()
        r = await c.completions.create(model="helper", prompt="hello", max_tokens=0, echo=True, logprobs=1)
        ch = r.choices[0]
        assert ch.text == "hello" and ch.finish_reason == "length" and r.usage.completion_tokens == 0
        assert ch.logprobs.tokens == list("hello") and ch.logprobs.token_logprobs[0] is None
        scores = ch.logprobs.token_logprobs[1:]
        assert len(scores) == 4 and all(isinstance(v, float) for v in scores)
        assert ch.logprobs.top_logprobs[0] is None and all(len(t) == 1 for t in ch.logprobs.top_logprobs[1:])
        one = await c.completions.create(model="helper", prompt=list(b"hello"), max_tokens=1, echo=True, logprobs=1,
                                         temperature=0)
        plain = await c.completions.create(model="helper", prompt="hello", max_tokens=1, temperature=0)
        o = one.choices[0]
        assert o.text == "hello" + plain.choices[0].text and o.logprobs.token_logprobs[1:5] == scores
        assert len(o.logprobs.tokens) == 6 and one.usage.completion_tokens == 1
        v = await c.completions.create(model="helper", prompt="hello", max_tokens=1, extra_body={"prompt_logprobs": 2})
        pl = v.choices[0].model_extra["prompt_logprobs"]
        assert pl[0] is None and len(pl) == 5
        for j, entry in enumerate(pl[1:]):
            mine = entry[str(ord("hello"[j + 1]))]
            assert mine["logprob"] == scores[j] and mine["decoded_token"] == "hello"[j + 1] and mine["rank"] >= 1
            assert sum(1 for e in entry.values() if e["rank"] <= 2) >= 2
        chat = await c.chat.completions.create(model=BASE, messages=MSG, max_tokens=1, extra_body={"prompt_logprobs": 0})
        assert len(chat.model_extra["prompt_logprobs"]) == chat.usage.prompt_tokens
        with pytest.raises(openai.BadRequestError, match="echo true"):
            await c.completions.create(model=BASE, prompt="x", max_tokens=0)
        with pytest.raises(openai.BadRequestError, match="echo"):
            await c.completions.create(model=BASE, prompt="x", max_tokens=1, echo=True, stream=True)

    run(main())
