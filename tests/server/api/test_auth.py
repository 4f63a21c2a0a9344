"""API keys: the key file, authentication, scopes and tenant patterns (no HTTP, no torch)."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from loraplex.adapters.errors import ConfigError, LoraplexError
from loraplex.server.api import auth
from loraplex.server.api.auth import (
    AuthenticationError,
    KeyStore,
    PermissionDeniedError,
    Principal,
    hash_key,
)

ACME_KEY = "acme-secret-key-0123456789"
OPS_KEY = "ops-plain-text-key-abcdef"
GLOBEX_KEY = "globex-key-zzzzzzzzzzzzzz"

KEY_FILE = f"""
keys:
  - name: acme-app
    key_sha256: {hash_key(ACME_KEY)}
    scopes: [inference]
    adapters: ["acme-*", "shared-faq"]
  - name: ops
    key: "{OPS_KEY}"
    scopes: [inference, admin, metrics]
  - name: globex
    key_sha256: {hash_key(GLOBEX_KEY).upper()}
    adapters: ["globex-*"]
    max_concurrent: 4
"""


@pytest.fixture
def store(tmp_path) -> KeyStore:
    path = tmp_path / "keys.yaml"
    path.write_text(KEY_FILE)
    return KeyStore.from_file(path)


def test_file_parses(store):
    assert not store.is_open and len(store) == 3
    assert store.names == ["acme-app", "ops", "globex"]
    assert store.describe() == "3 API keys (3 inference, 1 admin, 1 metrics; 2 limited to some adapters; 1 with a concurrency limit)"
    for key in (ACME_KEY, OPS_KEY, GLOBEX_KEY, hash_key(ACME_KEY)):
        assert key not in store.describe() and key not in repr(store._keys)


def test_json_file(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"name": "a", "key": ACME_KEY, "scopes": ["admin"]}]}))
    s = KeyStore.from_file(path)
    p = s.authenticate(f"Bearer {ACME_KEY}")
    assert p.name == "a" and p.scopes == {"admin"} and p.patterns == ("*",)
    assert s.describe() == "1 API key (0 inference, 1 admin, 0 metrics)"


def _entry(**kw):
    e = {"name": "k", "key": ACME_KEY}
    e.update(kw)
    return {k: v for k, v in e.items() if v is not ...}


BAD = [
    ({"keys": [_entry(scope=["inference"])]}, "keys[0] (k): unknown field(s) scope"),
    ({"keys": [_entry(scopes=["inference", "root"])]}, "unknown scope 'root'"),
    ({"keys": [_entry(scopes=[])]}, "scopes must be a non-empty list"),
    ({"keys": [_entry(key="")]}, "keys[0] (k): empty key"),
    ({"keys": [_entry(key=None)]}, "empty key"),
    ({"keys": [_entry(key="short-key")]}, "key shorter than 16 characters"),
    ({"keys": [_entry(key=12345678901234567890)]}, "key must be a string"),
    ({"keys": [_entry(key="has a space in the key")]}, "printable ASCII without spaces"),
    ({"keys": [_entry(key=..., key_sha256="abc123")]}, "key_sha256 must be 64 hexadecimal characters"),
    ({"keys": [_entry(key=..., key_sha256="g" * 64)]}, "key_sha256 must be 64 hexadecimal characters"),
    ({"keys": [_entry(key_sha256=hash_key(OPS_KEY))]}, "exactly one of 'key' and 'key_sha256'"),
    ({"keys": [_entry(key=...)]}, "exactly one of 'key' and 'key_sha256'"),
    ({"keys": [_entry(name=...)]}, "keys[0]: missing 'name'"),
    ({"keys": [_entry(name="bad name")]}, "invalid name"),
    ({"keys": [_entry(), _entry(key=OPS_KEY)]}, "duplicate key name 'k'"),
    ({"keys": [_entry(), _entry(name="k2")]}, "keys 'k' and 'k2' are the same key"),
    ({"keys": [_entry(), _entry(name="k2", key=..., key_sha256=hash_key(ACME_KEY))]}, "are the same key"),
    ({"keys": [_entry(adapters=["acme-*@prod"])]}, "invalid adapter pattern 'acme-*@prod'"),
    ({"keys": [_entry(adapters=[])]}, "adapters must be a non-empty list"),
    ({"keys": [_entry(max_concurrent=0)]}, "max_concurrent must be a whole number >= 1"),
    ({"keys": [_entry(max_concurrent=2.5)]}, "max_concurrent must be a whole number >= 1"),
    ({"keys": [_entry(max_concurrent="8")]}, "max_concurrent must be a whole number >= 1"),
    ({"keys": [_entry(max_concurrent=True)]}, "max_concurrent must be a whole number >= 1"),
    ({"keys": ["just-a-string"]}, "keys[0]: expected a mapping"),
    ({"keys": []}, "'keys' is empty"),
    ({"keys": {"name": "k"}}, "'keys' must be a list"),
    ({"key": []}, "unknown field(s) key (expected 'keys')"),
    ({}, "missing 'keys' list"),
    ([1, 2], "expected a mapping with a 'keys' list"),
]


@pytest.mark.parametrize("data,message", BAD, ids=[m for _, m in BAD])
def test_bad_configs(tmp_path, data, message):
    path = tmp_path / "keys.yaml"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as exc:
        KeyStore.from_file(path)
    text = str(exc.value)
    assert message in text, text
    assert "\n" not in text and str(path) in text
    for secret in (ACME_KEY, OPS_KEY, "short-key", "has a space in the key"):
        assert secret not in text


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="unreadable"):
        KeyStore.from_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("keys: [\n  - name: a\n   oops: {")
    with pytest.raises(ConfigError, match="not valid YAML or JSON") as exc:
        KeyStore.from_file(bad)
    assert "\n" not in str(exc.value)


def test_bearer_and_x_api_key(store):
    assert store.authenticate(f"Bearer {ACME_KEY}").name == "acme-app"
    assert store.authenticate(f"bearer   {OPS_KEY} ").name == "ops"
    assert store.authenticate(None, GLOBEX_KEY).name == "globex"  # uppercase hash in the file
    assert store.authenticate("Basic dXNlcjpwYXNz", OPS_KEY).name == "ops"
    assert store.authenticate(f"Bearer {ACME_KEY}", OPS_KEY).name == "acme-app"  # Authorization first


@pytest.mark.parametrize("authorization,x_api_key", [
    (None, None), ("", ""), ("Bearer", None), ("Bearer ", None), (ACME_KEY, None),  # no scheme
    ("Bearer wrong-key-but-long-enough", None), (None, "wrong-key-but-long-enough"),
    (f"Bearer {ACME_KEY}x", None), (f"Bearer {hash_key(ACME_KEY)}", None),  # the hash is not the key
])
def test_rejected(store, authorization, x_api_key):
    with pytest.raises(AuthenticationError) as exc:
        store.authenticate(authorization, x_api_key)
    err = exc.value
    assert isinstance(err, LoraplexError)
    assert (err.status, err.type, err.message) == (401, "authentication_error", "invalid or missing API key")
    assert err.headers == {"WWW-Authenticate": "Bearer"}
    for sent in (authorization, x_api_key):
        if sent:
            assert sent.split()[-1] not in str(err)


def test_compare_digest_called_for_every_key(store, monkeypatch):
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for header in (f"Bearer {ACME_KEY}", f"Bearer {GLOBEX_KEY}", "Bearer no-such-key-at-all-here"):
        calls.clear()
        try:
            store.authenticate(header)
        except AuthenticationError:
            pass
        assert len(calls) == 3  # the first key matching does not stop the loop
        assert {b for _, b in calls} == {k.digest for k in store._keys}
        token = header.split()[1]
        assert all(a == hashlib.sha256(token.encode()).digest() for a, _ in calls)  # digests, not keys


def test_scopes(store):
    acme = store.authenticate(f"Bearer {ACME_KEY}")
    ops = store.authenticate(f"Bearer {OPS_KEY}")
    acme.require("inference")
    ops.require("inference")
    ops.require("admin")
    ops.require("metrics")
    with pytest.raises(PermissionDeniedError):
        acme.require("metrics")
    with pytest.raises(PermissionDeniedError) as exc:
        acme.require("admin")
    assert (exc.value.status, exc.value.type) == (403, "permission_error")
    assert "acme-app" in str(exc.value) and ACME_KEY not in str(exc.value)
    assert not acme.has("admin") and ops.has("admin")
    with pytest.raises(ValueError):
        ops.require("superuser")


def test_patterns_and_visible(store):
    acme = store.authenticate(f"Bearer {ACME_KEY}")
    assert acme.may_use("acme-support")
    assert acme.may_use("acme-support@3") and acme.may_use("acme-support@prod")
    assert acme.may_use("shared-faq") and not acme.may_use("shared-faq-2")
    assert not acme.may_use("globex-sales") and not acme.may_use("xacme-support")
    assert not acme.may_use("ACME-support")  # case-sensitive
    names = ["globex-sales", "acme-a", "shared-faq", "acme-b@2", "other"]
    assert acme.visible(names) == ["acme-a", "shared-faq", "acme-b@2"]
    assert store.authenticate(f"Bearer {OPS_KEY}").visible(names) == names
    assert Principal("p", frozenset({"inference"}), ("[ab]-?",)).visible(["a-1", "b-2", "c-3", "a-12"]) == ["a-1", "b-2"]


def test_max_concurrent(store):
    assert store.authenticate(f"Bearer {GLOBEX_KEY}").max_concurrent == 4
    assert store.authenticate(f"Bearer {ACME_KEY}").max_concurrent is None  # no limit of its own
    assert KeyStore.open().authenticate(None).max_concurrent is None


def test_open_store():
    s = KeyStore.open()
    assert s.is_open and len(s) == 0
    assert s.describe() == "no API key configured: the server is open to anyone who can reach it"
    for args in [(None,), ("Bearer anything",), (None, "whatever")]:
        p = s.authenticate(*args)
        p.require("admin")
        p.require("inference")
        p.require("metrics")
        assert p.may_use("anything") and p.visible(["a", "b"]) == ["a", "b"]
    assert KeyStore.load().is_open


def test_single_api_key(tmp_path):
    s = KeyStore.load(api_key=f"  {OPS_KEY}\n")
    assert s.describe() == "1 API key (1 inference, 1 admin, 1 metrics)"
    p = s.authenticate(f"Bearer {OPS_KEY}")
    assert p.name == "api-key" and p.scopes == {"inference", "admin", "metrics"} and p.may_use("anything")
    assert p.max_concurrent is None
    with pytest.raises(AuthenticationError):
        s.authenticate(f"Bearer {ACME_KEY}")
    for bad, msg in [("", "empty key"), ("   ", "empty key"), ("short", "shorter than 16")]:
        with pytest.raises(ConfigError, match=msg) as exc:
            KeyStore.from_api_key(bad)
        assert "LORAPLEX_API_KEY" in str(exc.value)

    # with a file: both kinds of keys work, and the same key twice is refused
    path = tmp_path / "keys.yaml"
    path.write_text(KEY_FILE)
    both = KeyStore.load(path, api_key="env-key-0123456789abcdef")
    assert len(both) == 4
    assert both.authenticate(None, "env-key-0123456789abcdef").name == "api-key"
    assert both.authenticate(f"Bearer {ACME_KEY}").name == "acme-app"
    with pytest.raises(ConfigError, match="same key"):
        KeyStore.load(path, api_key=OPS_KEY)


def test_from_keys_defaults():
    s = KeyStore.from_keys([{"name": "a", "key": ACME_KEY}, {"name": "b", "key": OPS_KEY, "scopes": "admin",
                                                             "adapters": "team-b-*"}])
    a = s.authenticate(f"Bearer {ACME_KEY}")
    b = s.authenticate(f"Bearer {OPS_KEY}")
    assert a.scopes == {"inference"} and a.patterns == ("*",)  # least privilege by default
    assert b.scopes == {"admin"} and b.patterns == ("team-b-*",)
    with pytest.raises(ConfigError, match=r"^keys: keys\[1\] \(b\): unknown scope"):
        KeyStore.from_keys([{"name": "a", "key": ACME_KEY}, {"name": "b", "key": OPS_KEY, "scopes": ["x"]}])


def test_a_metrics_key_reads_metrics_and_nothing_else():
    store = KeyStore.load(api_key=OPS_KEY, metrics_key="scrape-key-0123456789abcdef")
    who = store.authenticate("Bearer scrape-key-0123456789abcdef", None)
    assert who.scopes == frozenset({"metrics"}) and who.name == "metrics-key"
    with pytest.raises(ConfigError, match="needs API keys"):  # alone it would leave the server open
        KeyStore.load(metrics_key="scrape-key-0123456789abcdef")
    with pytest.raises(ConfigError, match="same key"):
        KeyStore.load(api_key=OPS_KEY, metrics_key=OPS_KEY)
    with pytest.raises(ConfigError, match="LORAPLEX_METRICS_KEY"):
        KeyStore.load(api_key=OPS_KEY, metrics_key="short")


def test_cache_salt_is_per_key_and_a_request_salt_narrows_it():
    from loraplex.server.api.auth import OPEN_PRINCIPAL, Principal

    acme, globex = Principal("acme", frozenset({"inference"})), Principal("globex", frozenset({"inference"}))
    assert acme.cache_salt(None) != globex.cache_salt(None)
    assert acme.cache_salt(None) == Principal("acme", frozenset({"admin"})).cache_salt(None)
    assert acme.cache_salt("a") not in (acme.cache_salt(None), acme.cache_salt("b"), globex.cache_salt("a"))
    assert OPEN_PRINCIPAL.cache_salt(None) is None  # one open server: one cache, unless a request salts it
    assert OPEN_PRINCIPAL.cache_salt("x") == "x"
    assert Principal("anonymous", frozenset()).cache_salt(None) is not None  # a key named so is still a key
