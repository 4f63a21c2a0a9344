"""Streaming and client disconnects over real HTTP: the ScriptedBackend's app under uvicorn (in a
thread), driven by the official openai client and by httpx."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from scripted_world import MSG, LiveApi, make_api, wait_for, world  # noqa: F401  (the module fixture)

BASE = "tiny-llama"


@pytest.fixture(scope="module")
def live(world):  # noqa: F811
    server = LiveApi(make_api(world, token_delay=0.002))
    yield server
    server.stop()


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def test_chat_stream_matches_the_whole_answer(client):
    chunks = list(client.chat.completions.create(model="helper@2", messages=MSG, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.model == "helper@2" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 6
    assert len({c.id for c in chunks}) == 1
    whole = client.chat.completions.create(model="helper@2", messages=MSG, max_tokens=6, temperature=0)
    assert text == whole.choices[0].message.content and len(text) == 6


def test_completion_stream_and_stop_string(client):
    whole = client.completions.create(model="helper@1", prompt="w5", max_tokens=20, temperature=0)
    pieces = list(client.completions.create(model="helper@1", prompt="w5", max_tokens=20, temperature=0, stream=True))
    assert all(p.object == "text_completion" for p in pieces)
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text
    text = whole.choices[0].text
    stop = text[8:10]
    cut = list(client.completions.create(model="helper@1", prompt="w5", max_tokens=20, temperature=0, stop=[stop],
                                         stream=True))
    assert "".join(p.choices[0].text for p in cut) == text[:text.index(stop)]
    assert cut[-1].choices[0].finish_reason == "stop"


def test_async_client_streams(live):
    async def main():
        c = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        stream = await c.chat.completions.create(model=BASE, messages=MSG, max_tokens=4, stream=True)
        return [chunk async for chunk in stream]

    chunks = asyncio.run(main())
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len("".join(c.choices[0].delta.content or "" for c in chunks)) == 4


def test_streaming_error_is_an_sse_error_event(live):
    body = {"model": BASE, "messages": [{"role": "user", "content": "x" * 600}], "max_tokens": 2, "stream": True}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    errs = [json.loads(line[5:]) for line in lines if "error" in line]
    assert errs and "tokens" in errs[0]["error"]["message"] and lines[-1] == "data: [DONE]"


def test_stream_disconnect_aborts_the_generation(live):
    backend = live.api.backend
    body = {"model": "helper@1", "messages": MSG, "max_tokens": 5000, "stream": True}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data:")
        rid = json.loads(next(line for line in lines if line.startswith("data:"))[5:])["id"]
    assert wait_for(lambda: rid in backend.aborted), "the backend never saw the abort"
    assert wait_for(lambda: backend.stats()["running"] == 0)
    assert live.api.app.state.api.admission.outstanding == 0
    assert 'outcome="aborted"' in httpx.get(live.url + "/metrics").text


def test_non_streamed_disconnect_aborts_the_generation(live):
    backend = live.api.backend
    before = len(backend.aborted)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/completions", json={"model": "helper@1", "prompt": "x", "max_tokens": 5000},
                   timeout=httpx.Timeout(5, read=0.3))
    assert wait_for(lambda: len(backend.aborted) > before), "the backend never saw the abort"
    assert wait_for(lambda: backend.stats()["running"] == 0 and live.api.app.state.api.admission.outstanding == 0)


def test_a_stream_past_the_request_timeout_ends_with_an_error_event(world):  # noqa: F811
    from loraplex.server.api.app import RequestLimits

    server = LiveApi(make_api(world, token_delay=0.05, limits=RequestLimits(request_timeout=0.5)))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        pieces = []
        with pytest.raises(openai.APIError) as exc:
            for chunk in client.chat.completions.create(model=BASE, messages=MSG, max_tokens=200, stream=True):
                pieces += [c.delta.content for c in chunk.choices if c.delta.content]
        assert "took longer than 0.5 s" in str(exc.value.message)
        assert 0 < len(pieces) < 200  # it streamed, then the timeout cut it short
        backend = server.api.backend
        assert wait_for(lambda: not backend.running and len(backend.aborted) == 1)  # the generation was aborted
    finally:
        server.stop()
