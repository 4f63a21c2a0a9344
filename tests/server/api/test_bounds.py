"""Every field of every request body, at the extremes of its type: a clear 400 (413 for a body over the limit),
never a 500, and the engine serves the next request. The fields are read from the schemas themselves, so a new
field is covered the day it is added."""

from __future__ import annotations

import json

import pytest
from scripted_world import MSG, make_api, run, world  # noqa: F401  (the module fixture)

from loraplex.server.api.schemas import ChatCompletionRequest, CompletionRequest

BASE = "tiny-llama"
HUGE_LIST = [0] * 20_000
EXTREMES = {
    "int64 max + 1": 2**63, "int64 min - 1": -(2**63) - 1, "uint64 max + 1": 2**64, "negative": -1,
    "NaN": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "huge list": HUGE_LIST,
    "deep nesting": json.loads("[" * 200 + "]" * 200), "empty string": "", "object": {"a": {"b": [1]}},
}
VALID = {"chat": {"model": BASE, "messages": MSG, "max_tokens": 3},
         "completion": {"model": BASE, "prompt": "hello", "max_tokens": 3}}
SCHEMAS = {"chat": ChatCompletionRequest, "completion": CompletionRequest}
PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}
# (field, extreme) that are legitimate values of that field: answered 200 (or a 400 of the engine's own checks)
ACCEPTED = {("seed", "int64 max + 1"), ("seed", "negative"), ("top_k", "negative"), ("presence_penalty", "negative"),
            ("frequency_penalty", "negative"), ("stream_options", "object"), ("user", "empty string"),
            ("prompt", "empty string")}


def _cases():
    for kind, schema in SCHEMAS.items():
        for field in sorted(schema.model_fields):
            for label in EXTREMES:
                yield kind, field, label


@pytest.fixture(scope="module")
def api(world):  # noqa: F811
    return make_api(world, eos_after=None)


@pytest.mark.parametrize("kind, field, label", list(_cases()))
def test_extreme_value_is_refused_cleanly(api, kind, field, label):
    body = {**VALID[kind], field: EXTREMES[label]}
    raw = json.dumps(body)  # NaN and Infinity as JSON's common extension, as hostile clients send them

    async def main():
        async with api.client() as c:
            r = await c.post(PATHS[kind], content=raw, headers={"content-type": "application/json"})
            after = await c.post(PATHS[kind], json=VALID[kind])
        return r, after

    r, after = run(main())
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if (field, label) in ACCEPTED:
        assert r.status_code in (200, 400), r.text[:300]
    elif r.status_code != 200:
        assert r.status_code in (400, 404, 413), r.text[:300]
        err = r.json()["error"]
        assert err["message"] and err["type"] in ("invalid_request_error", "not_found_error"), err
        assert "Traceback" not in r.text
    assert after.status_code == 200, after.text[:300]  # the engine serves the next request


def test_every_numeric_field_has_a_range():
    """A number without bounds would let a client pick its own cost or crash a kernel: each one is bounded."""
    unbounded = []
    for kind, schema in SCHEMAS.items():
        for name, info in schema.model_fields.items():
            text = json.dumps(schema.model_json_schema()["properties"][name])
            if '"integer"' in text or '"number"' in text:
                if not any(k in text for k in ("maximum", "exclusiveMaximum", "const", "enum")):
                    unbounded.append(f"{kind}.{name}")
    assert unbounded == []


@pytest.mark.parametrize("kind", list(SCHEMAS))
def test_a_cache_salt_past_its_length_is_a_400(api, kind):
    async def main():
        async with api.client() as c:
            return (await c.post(PATHS[kind], json={**VALID[kind], "cache_salt": "s" * 257}),
                    await c.post(PATHS[kind], json={**VALID[kind], "cache_salt": "s" * 256}))

    long, ok = run(main())
    assert long.status_code == 400 and "cache_salt" in long.text and ok.status_code == 200


@pytest.mark.parametrize("kind", list(SCHEMAS))
def test_a_cache_salt_that_is_not_utf8_is_a_400(api, kind):
    async def main():
        async with api.client() as c:
            body = json.dumps({**VALID[kind], "cache_salt": "x"}).replace('"x"', '"\\ud800"')
            return await c.post(PATHS[kind], content=body, headers={"content-type": "application/json"})

    r = run(main())
    assert r.status_code == 400 and "cache_salt" in r.text, r.text
