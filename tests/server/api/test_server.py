"""The OpenAI-compatible server, live, through the official openai client (streaming included)."""

from __future__ import annotations

import json
import time
from collections import Counter

import httpx
import openai
import pytest

from loraplex.adapters import AdapterCache, AdapterRegistry
from loraplex.adapters.routes import RouteStore
from engine_fixtures import ADAPTERS, make_peft_adapters
from loraplex.server.api.settings import ServerSettings
from server_fixtures import LiveServer, engine_dims, free_port, save_tiny_base, vllm_settings


@pytest.fixture(scope="module")
def world(tmp_path_factory, engine_kind):
    """A tiny base, a folder registry with helper@1, helper@2 (alias prod -> 1) and other@1; served by
    the engine backend ``engine_kind`` (the tests run once per backend)."""
    root = tmp_path_factory.mktemp(f"server-{engine_kind}")
    dims = engine_dims(engine_kind)
    base = save_tiny_base(root / "tiny-base", dims)
    folders = make_peft_adapters(root / "peft", specs={**ADAPTERS, "all8b": ADAPTERS["all8"]}, dims=dims)
    reg_uri = (root / "registry").as_uri()
    reg = AdapterRegistry(reg_uri, cache=AdapterCache(root / "cache"))
    reg.push(folders["all8"], "helper", base_model=str(base))
    reg.push(folders["qv4"], "helper", base_model=str(base))
    reg.tag("helper@1", "prod")
    reg.push(folders["mlp16rs"], "other", base_model=str(base))
    reg.push(folders["all8b"], "acme-bot", base_model=str(base))
    return {"root": root, "base": base, "registry": reg, "reg_uri": reg_uri, "folders": folders, "engine": engine_kind,
            "dims": dims}


def settings(world, **kw) -> ServerSettings:
    return ServerSettings(model=str(world["base"]), quantize="none", dtype="float32", registry=world["reg_uri"],
                          port=free_port(), max_lora_rank=32, max_model_len=256, registry_ttl=0.0,
                          **{**vllm_settings(world["engine"]), **kw})


@pytest.fixture(scope="module")
def server(world, monkeypatch_module):
    monkeypatch_module.setenv("LORAPLEX_HOME", str(world["root"] / "home"))
    s = LiveServer(settings(world))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


BASE = "tiny-base"
MSG = [{"role": "user", "content": "w10 w11 w12"}]


def test_chat_completion_shape(client):
    r = client.chat.completions.create(model=BASE, messages=MSG, max_tokens=5, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == BASE
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5 and r.usage.total_tokens == r.usage.prompt_tokens + 5


def test_chat_streaming_with_usage(client):
    chunks = list(client.chat.completions.create(model="helper@2", messages=MSG, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.model == "helper@2" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 6
    whole = client.chat.completions.create(model="helper@2", messages=MSG, max_tokens=6, temperature=0)
    assert text == whole.choices[0].message.content


def test_completions_string_and_list(client):
    r = client.completions.create(model=BASE, prompt="w5 w6 w7", max_tokens=4, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text and r.usage.completion_tokens == 4
    r2 = client.completions.create(model="helper", prompt=["w5 w6", "w7 w8 w9"], max_tokens=3, temperature=0)
    assert [c.index for c in r2.choices] == [0, 1] and r2.usage.completion_tokens == 6 and r2.model == "helper@2"
    s = list(client.completions.create(model=BASE, prompt="w5 w6 w7", max_tokens=4, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in s) == r.choices[0].text


def test_model_resolution(client, server):
    def served(model):
        raw = client.chat.completions.with_raw_response.create(model=model, messages=MSG, max_tokens=1, temperature=0)
        body = raw.parse()
        assert raw.headers["x-loraplex-adapter"] == body.model
        return body.model

    assert served("helper") == "helper@2"  # latest
    assert served("helper@1") == "helper@1"
    assert served("helper@prod") == "helper@1"
    assert served(f"{BASE}:helper@prod") == "helper@1"
    assert served("base") == BASE


def test_adapters_change_the_output_and_versions_differ(client):
    outs = {m: client.completions.create(model=m, prompt="w20 w21 w22", max_tokens=8, temperature=0).choices[0].text
            for m in (BASE, "helper@1", "helper@2")}
    assert len(set(outs.values())) == 3


def test_models_list(client):
    ids = {m.id: m for m in client.models.list().data}
    assert BASE in ids and ids[BASE].parent is None if hasattr(ids[BASE], "parent") else True
    for mid in ("helper", "helper@1", "helper@2", "helper@prod", "other", "other@1"):
        assert mid in ids, mid
        assert ids[mid].model_extra.get("parent") == BASE
        assert "metadata" not in ids[mid].model_extra
    # how the base is held, as set (quantize none, float32: the test settings) or chosen for the hardware
    assert ids[BASE].model_extra["metadata"] == {"quantize": "none", "weights": "dense", "dtype": "float32",
                                                 "chosen_for": "set"}


def test_unknown_model_is_404_envelope(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="ghost", messages=MSG, max_tokens=1)
    assert e.value.body["type"] == "not_found_error" and "ghost" in e.value.body["message"]
    for bad in ("helper@9", "helper@nope", "other-base:helper", "../etc"):
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=bad, messages=MSG, max_tokens=1)


def test_bad_requests_are_400_envelopes(server):
    url = server.url + "/v1/chat/completions"
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (json.dumps({"model": BASE, "messages": []}).encode(), 400, "messages"),
        (json.dumps({"model": BASE, "messages": MSG, "temperature": 5}).encode(), 400, "temperature"),
        (json.dumps({"model": BASE, "messages": MSG, "n": 17}).encode(), 400, "n"),
        (json.dumps({"model": BASE, "messages": MSG, "max_tokens": 0}).encode(), 400, "max_tokens"),
        (json.dumps({"model": BASE, "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "role"),
        (json.dumps({"messages": MSG}).encode(), 400, "model"),
        (json.dumps({"model": BASE, "messages": MSG, "adapters": [{"name": "helper", "weight": "heavy"}]}).encode(), 400, "weight"),
        (json.dumps({"model": "helper", "messages": MSG, "adapters": [{"name": "helper"}]}).encode(), 400, "base model"),
        (json.dumps({"model": BASE, "messages": MSG, "merge": {"strategy": "ties"}}).encode(), 400, "adapters"),
        (json.dumps({"model": BASE, "messages": MSG, "merge": {"strategy": "bogus"},
                     "adapters": [{"name": "helper"}]}).encode(), 400, "strategy"),
        (b"[1, 2, 3]", 400, ""),
    ]
    for raw, status, needle in cases:
        r = httpx.post(url, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == status, (raw, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and needle in err["message"], (raw, err)
    big = httpx.post(url, content=b"{" + b" " * (2 << 20) + b"}", headers={"content-type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["type"] == "invalid_request_error"
    long_prompt = {"model": BASE, "messages": [{"role": "user", "content": " ".join(["w9"] * 400)}], "max_tokens": 2}
    r = httpx.post(url, json=long_prompt)
    assert r.status_code == 400 and "tokens" in r.json()["error"]["message"]


def test_mixture_and_merge_through_extra_body(client):
    mix = client.chat.completions.create(model=BASE, messages=MSG, max_tokens=6, temperature=0,
                                         extra_body={"adapters": [{"name": "helper@1", "weight": 0.7},
                                                                  {"name": "other", "weight": 0.3}]})
    assert mix.model == "helper@1*0.7+other@1*0.3" and mix.choices[0].message.content
    merged = client.chat.completions.create(model=BASE, messages=MSG, max_tokens=6, temperature=0,
                                            extra_body={"adapters": [{"name": "helper@1", "weight": 0.6},
                                                                     {"name": "acme-bot", "weight": 0.4}],
                                                        "merge": {"strategy": "ties", "density": 0.5}})
    assert merged.model.startswith("merge-")
    again = client.chat.completions.create(model=BASE, messages=MSG, max_tokens=6, temperature=0,
                                           extra_body={"adapters": [{"name": "helper@1", "weight": 0.6},
                                                                    {"name": "acme-bot", "weight": 0.4}],
                                                       "merge": {"strategy": "ties", "density": 0.5}})
    assert again.model == merged.model and again.choices[0].message.content == merged.choices[0].message.content
    # a cat merge is exactly the weighted mixture
    cat = client.chat.completions.create(model=BASE, messages=MSG, max_tokens=6, temperature=0,
                                         extra_body={"adapters": [{"name": "helper@1", "weight": 0.7},
                                                                  {"name": "other", "weight": 0.3}],
                                                     "merge": {"strategy": "cat"}})
    assert cat.choices[0].message.content == mix.choices[0].message.content


def test_mixture_above_max_lora_rank(client, world):
    """Four adapters of ranks 8 + 16 + 8 + 4 = 36 against max_lora_rank 32. The native engine mixes them
    in the batch (each adapter in its own slot); vLLM serves one adapter per request, so its exact
    mixture would be one adapter of rank 36: a clear 400 that says so, not an engine failure."""
    mix = [{"name": "helper@1", "weight": 0.4}, {"name": "other", "weight": 0.3}, {"name": "acme-bot", "weight": 0.2},
           {"name": "helper@2", "weight": 0.1}]
    if world["engine"] == "native":
        r = client.completions.create(model=BASE, prompt="w3", max_tokens=2, extra_body={"adapters": mix})
        assert r.usage.completion_tokens == 2
        return
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=BASE, prompt="w3", max_tokens=2, extra_body={"adapters": mix})
    assert "summed rank 36" in e.value.body["message"] and "max_lora_rank 32" in e.value.body["message"]
    # the engine still serves
    assert client.completions.create(model="helper@1", prompt="w3", max_tokens=2).usage.completion_tokens == 2


def test_stop_strings_cut_the_text(client):
    whole = client.completions.create(model="helper@1", prompt="w20 w21", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    words = whole.choices[0].text.split()
    assert len(words) >= 4 and whole.choices[0].finish_reason == "length"
    stop = words[2]
    cut = client.completions.create(model="helper@1", prompt="w20 w21", max_tokens=8, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    text = whole.choices[0].text
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[:text.index(stop)]


def test_seeded_sampling_is_reproducible_and_logprobs(client):
    kw = dict(model="helper", messages=MSG, max_tokens=6, temperature=1.0, seed=7)
    a = client.chat.completions.create(**kw).choices[0].message.content
    assert a == client.chat.completions.create(**kw).choices[0].message.content
    r = client.chat.completions.create(model=BASE, messages=MSG, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)  # greedy took the best


def test_ab_route_is_sticky_and_split(client, server, world):
    """1,000 users over a 90/10 route: within +-3 points of the weights, and every user sticky."""
    import asyncio

    routes = RouteStore(world["registry"])
    routes.set("helper", {"helper@1": 90, "helper@2": 10})

    async def ask_all(users, header: bool):
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        sem = asyncio.Semaphore(16)

        async def one(u):
            async with sem:
                kw = {"extra_headers": {"x-loraplex-user": u}} if header else {"user": u}
                raw = await aclient.completions.with_raw_response.create(model="helper", prompt="w3", max_tokens=1, **kw)
                return u, raw.headers["x-loraplex-adapter"]

        return dict(await asyncio.gather(*(one(u) for u in users)))

    try:
        users = [f"user-{i}" for i in range(1000)]
        seen = asyncio.run(ask_all(users, header=False))
        share = Counter(seen.values())
        assert abs(share["helper@1"] / 1000 - 0.9) <= 0.03, share
        again = asyncio.run(ask_all(users[::10], header=True))  # sticky, by body field or header
        assert all(again[u] == seen[u] for u in again)
    finally:
        routes.delete("helper")
    assert client.completions.create(model="helper", prompt="w3", max_tokens=1, user="user-1").model == "helper@2"


def test_new_versions_and_alias_moves_are_picked_up_without_restart(client, world):
    reg = world["registry"]
    reg.tag("helper@2", "prod")
    try:
        assert client.completions.create(model="helper@prod", prompt="w3", max_tokens=1).model == "helper@2"
    finally:
        reg.tag("helper@1", "prod")
    assert client.completions.create(model="helper@prod", prompt="w3", max_tokens=1).model == "helper@1"


def test_client_disconnect_frees_the_request(server):
    backend = server.backend
    with httpx.stream("POST", server.url + "/v1/chat/completions",
                      json={"model": "helper@1", "messages": MSG, "max_tokens": 200, "stream": True,
                            "ignore_eos": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data:")
        next(lines)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and backend.stats()["running"]:
        time.sleep(0.05)
    s = backend.stats()
    assert s["running"] == 0 and s["kv_slots_used"] == 0


def test_metrics_and_health(server, client):
    client.completions.create(model="helper@1", prompt="w3", max_tokens=2)
    text = httpx.get(server.url + "/metrics").text
    assert 'loraplex_requests_total{adapter="helper",outcome="ok",version="1"}' in text
    assert "loraplex_ttft_seconds_bucket" in text and "loraplex_kv_slots_total" in text
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").status_code == 200


def test_admin_load_unload_and_status(server, client, world):
    url = server.url
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "local-one", "lora_path": str(world["folders"]["qv4"])})
    assert r.status_code == 200, r.text
    out = client.completions.create(model="local-one", prompt="w3 w4", max_tokens=4, temperature=0)
    assert out.model == "local-one"
    assert "local-one" in {m.id for m in client.models.list().data}
    client.completions.create(model="helper@1", prompt="w3", max_tokens=1)
    status = httpx.get(url + "/v1/adapters").json()["data"]
    assert any(a["id"] == "helper@1" and a["tier"] in ("device", "host") for a in status)
    assert httpx.post(url + "/v1/adapters/helper@2/pin").json() == {"id": "helper@2", "pinned": True}
    pinned = {a["id"]: a for a in httpx.get(url + "/v1/adapters").json()["data"]}
    assert pinned["helper@2"]["pinned"] is True
    assert httpx.post(url + "/v1/adapters/helper@2/unpin").json()["pinned"] is False
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "local-one"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="local-one", prompt="w3", max_tokens=1)
    bad = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(world["root"] / "nope")})
    assert bad.status_code == 400 and "does not exist" in bad.json()["error"]["message"]
    assert httpx.post(url + "/v1/admin/refresh").json() == {"refreshed": True}


def test_route_show_reads_per_arm_metrics_from_the_server(client, server, world):
    import subprocess
    import sys

    routes = RouteStore(world["registry"])
    routes.set("helper", {"helper@1": 50, "helper@2": 50})
    try:
        for i in range(20):
            client.completions.create(model="helper", prompt="w3", max_tokens=2, user=f"u{i}")
        env = {"LORAPLEX_HOME": str(world["root"] / "home"), "PATH": ""}
        p = subprocess.run([sys.executable, "-m", "loraplex", "route", "show", "helper", "--server", server.url,
                            "--registry", world["reg_uri"], "--json"], capture_output=True, text=True, env=env)
        assert p.returncode == 0, p.stderr
        arms = {a["arm"]: a for a in json.loads(p.stdout)["arms"]}
        assert set(arms) == {"helper@1", "helper@2"}
        assert all(a["requests"] > 0 and a["generation_tokens"] >= 2 and a["e2e_p50"] for a in arms.values())
        text = subprocess.run([sys.executable, "-m", "loraplex", "route", "show", "helper", "--server", server.url,
                               "--registry", world["reg_uri"]], capture_output=True, text=True, env=env).stdout
        assert "REQUESTS" in text and "helper@1" in text
        bad = subprocess.run([sys.executable, "-m", "loraplex", "route", "show", "helper", "--server",
                              "http://127.0.0.1:1", "--registry", world["reg_uri"]], capture_output=True, text=True, env=env)
        assert bad.returncode == 1 and bad.stderr.startswith("loraplex: error: cannot read metrics")
    finally:
        routes.delete("helper")


def test_streaming_error_is_an_sse_error_event(server):
    body = {"model": BASE, "messages": [{"role": "user", "content": " ".join(["w9"] * 400)}], "max_tokens": 2,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    errs = [json.loads(line[5:]) for line in lines if "error" in line]
    assert errs and "tokens" in errs[0]["error"]["message"] and lines[-1] == "data: [DONE]"


def test_prefix_cache_is_per_version_and_per_salt(client, world):
    """Live on both engines (vLLM's own prefix caching included): a prompt sent again is served from the cache
    (usage.prompt_tokens_details.cached_tokens); the same prompt to another version of the same adapter name,
    or under another cache_salt, computes every token again, and gives the uncached output."""
    import random

    rng = random.Random(f"prefix-{world['engine']}")
    prompt = " ".join(f"w{rng.randrange(10, 120)}" for _ in range(200))

    def ask(model, salt=None):
        extra = {"cache_salt": salt} if salt is not None else None
        r = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0, extra_body=extra)
        return r.choices[0].text, r.usage.prompt_tokens_details.cached_tokens

    first, cached = ask("helper@1")
    assert cached == 0
    again, cached = ask("helper@1")
    assert cached >= 16 and again == first  # at least a block of the 200-token prompt
    v2, cached = ask("helper@2")
    assert cached == 0  # another version under the same name never reads helper@1's blocks
    salted, cached = ask("helper@1", "tenant-a")
    assert cached == 0 and salted == first  # another salt: its own cache, the same computation
    assert ask("helper@1", "tenant-a")[1] >= 16
    assert ask("helper@1", "tenant-b")[1] == 0
    assert ask("helper@2")[0] == v2


def test_tokenize_and_detokenize_agree_with_generation(client, world):
    """/tokenize and /detokenize on both engines: the base's tokenizer (an adapter's name accepted), the chat
    prompt's count equal to what generation reports as prompt tokens, ids out of the vocabulary a 400."""
    root = client.with_options(base_url=client.base_url.copy_with(path="/"))
    chat = root.post("/tokenize", body={"model": "helper@1", "messages": MSG, "return_token_strs": True},
                     cast_to=object)
    r = client.chat.completions.create(model="helper@1", messages=MSG, max_tokens=1, temperature=0)
    assert chat["count"] == len(chat["tokens"]) == r.usage.prompt_tokens and chat["max_model_len"] == 256
    assert len(chat["token_strs"]) == chat["count"]
    plain = root.post("/tokenize", body={"prompt": "w5 w6 w7", "add_special_tokens": False}, cast_to=object)
    r = client.completions.create(model=BASE, prompt="w5 w6 w7", max_tokens=1, temperature=0)
    assert plain["count"] == r.usage.prompt_tokens
    assert root.post("/detokenize", body={"model": "other", "tokens": plain["tokens"]}, cast_to=object) == \
        {"prompt": "w5 w6 w7"}
    with pytest.raises(openai.BadRequestError, match="not in the vocabulary"):
        root.post("/detokenize", body={"tokens": [10**9]}, cast_to=object)
    with pytest.raises(openai.NotFoundError):
        root.post("/tokenize", body={"model": "ghost", "prompt": "x"}, cast_to=object)


def test_logit_bias_on_both_engines(client):
    """+100 on one token: greedy decoding writes only it, with or without an adapter; an id outside the
    vocabulary is a 400 before anything runs."""
    plain = client.completions.create(model="helper", prompt="w5 w6 w7", max_tokens=4, temperature=0,
                                      logprobs=1)
    forced_id = 17 if plain.choices[0].logprobs.tokens[0] != "w17" else 18
    for model in (BASE, "helper"):
        r = client.completions.create(model=model, prompt="w5 w6 w7", max_tokens=4, temperature=0,
                                      logit_bias={str(forced_id): 100}, logprobs=0)
        assert len(set(r.choices[0].logprobs.tokens)) == 1 and r.usage.completion_tokens == 4, r.choices[0]
    with pytest.raises(openai.BadRequestError, match="logit_bias token ids"):
        client.completions.create(model=BASE, prompt="x", max_tokens=1, logit_bias={str(10**6): 5})


def test_n_seeded_choices_on_both_engines(client):
    """n=3 with a seed: three different choices, the same three again, streamed under their indices."""
    kw = dict(model="helper@1", messages=MSG, max_tokens=6, temperature=1.0, seed=5, n=3)
    r = client.chat.completions.create(**kw)
    texts = [c.message.content for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert [c.message.content for c in client.chat.completions.create(**kw).choices] == texts
    assert 3 <= r.usage.completion_tokens <= 18  # every choice's tokens (EOS may end one early)
    streamed = {}
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert [streamed[i] for i in range(3)] == texts


def _peft_logprobs(world, adapter: str, ids: list[int]) -> list[float]:
    """log P(token j + 1 | tokens <= j) in float32 under the tiny base plus a PEFT adapter: the reference."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(world["base"], torch_dtype=torch.float32),
                                      str(world["folders"][adapter])).eval()
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [float(lp[j, ids[j + 1]]) for j in range(len(ids) - 1)]


def test_prompt_scoring_equals_transformers_peft_on_both_engines(client, world):
    """echo + logprobs + max_tokens 0 gives each prompt token's logprob under the adapter, equal to PEFT's in
    float32 (helper@1 is the all8 adapter); vLLM's prompt_logprobs gives the same numbers."""
    ids = [9, 23, 40, 41, 17, 100, 50, 64, 90]
    r = client.completions.create(model="helper@1", prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    got = r.choices[0].logprobs.token_logprobs
    want = _peft_logprobs(world, "all8", ids)
    assert got[0] is None and got[1:] == pytest.approx(want, abs=1e-4)
    assert r.choices[0].text == " ".join(f"w{i - 8}" for i in ids) and r.usage.completion_tokens == 0
    v = client.completions.create(model="helper@1", prompt=ids, max_tokens=1, temperature=0,
                                  extra_body={"prompt_logprobs": 0})
    pl = v.choices[0].model_extra["prompt_logprobs"]
    assert [pl[j + 1][str(t)]["logprob"] for j, t in enumerate(ids[1:])] == pytest.approx(want, abs=1e-4)


def test_lm_evaluation_harness_scores_through_the_server_as_through_transformers(server, world, tmp_path,
                                                                                  monkeypatch):
    """lm-evaluation-harness (``local-completions``, token-id prompts) against the server, on a multiple-choice
    task read from a local JSONL file, against the same harness on transformers + PEFT (float32): every choice's
    loglikelihood and greediness agree, and so does the accuracy."""
    import random

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rnd = random.Random(7)
    docs = [{"question": " ".join(f"w{rnd.randrange(120)}" for _ in range(rnd.randrange(3, 9))),
             "choices": [" ".join(f"w{rnd.randrange(120)}" for _ in range(rnd.randrange(1, 4))) for _ in range(3)],
             "answer": rnd.randrange(3)} for _ in range(12)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(
        "task: loraplex_tiny\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'docs.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")
    common = dict(tasks=["loraplex_tiny"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                  log_samples=True, batch_size=1)
    served = simple_evaluate(model="local-completions", model_args={
        "model": "helper@1", "base_url": f"{server.url}/v1/completions", "tokenizer": str(world["base"]),
        "tokenized_requests": True, "num_concurrent": 1, "max_retries": 1}, **common)
    ref = simple_evaluate(model="hf", model_args={"pretrained": str(world["base"]), "peft": str(world["folders"]["all8"]),
                                                  "dtype": "float32", "device": "cpu"}, **common)

    def scores(result):
        samples = sorted(result["samples"]["loraplex_tiny"], key=lambda s: s["doc_id"])
        return [[tuple(r) for r in s["filtered_resps"]] for s in samples]

    got, want = scores(served), scores(ref)
    assert len(got) == len(docs) and all(len(g) == 3 for g in got)
    for g, w in zip(got, want):
        assert [ll for ll, _ in g] == pytest.approx([ll for ll, _ in w], abs=1e-3)
        assert [greedy for _, greedy in g] == [greedy for _, greedy in w]
    assert served["results"]["loraplex_tiny"]["acc,none"] == ref["results"]["loraplex_tiny"]["acc,none"]
