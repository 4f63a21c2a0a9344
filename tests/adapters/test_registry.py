"""The registry suite: every test runs against a folder registry and a real SeaweedFS S3 bucket."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from ports import free_port

from loraplex.adapters import (
    AdapterCache, AdapterRegistry, BaseModelInfo, ConflictError, IncompatibleBaseError, IntegrityError,
    NotFoundError, StorageError,
)
from loraplex.adapters.basemodel import SMOLLM2_135M


def test_push_records_a_complete_manifest(registry, make_adapter, base_dir):
    folder = make_adapter(r=8)
    res = registry.push(folder, "support-bot", base_model=str(base_dir), message="first cut", creator="ana@lab",
                        training={"steps": 10})
    m = res.manifest
    assert res.created and m.ref == "support-bot@1"
    assert set(m.files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert m.files["adapter_model.safetensors"].size == (folder / "adapter_model.safetensors").stat().st_size
    assert m.base_model == "tiny-llama" and m.base_fingerprint["hidden_size"] == 64
    assert m.base_fingerprint["fingerprint"].startswith("sha256:")
    assert (m.rank, m.alpha, m.modules, m.creator, m.message) == (8, 16.0, 14, "ana@lab", "first cut")
    assert m.training == {"steps": 10} and m.created_at.endswith("Z")
    # A fresh client (another replica) sees the same manifest.
    other = AdapterRegistry(registry.uri)
    assert other.resolve("support-bot@1").to_json() == m.to_json()
    for ref in ("support-bot", "support-bot@1", "support-bot@latest", "support-bot@v1"):
        assert registry.resolve(ref).version == 1


def test_versions_count_up_and_identical_content_is_not_pushed_twice(registry, make_adapter):
    a, b = make_adapter(seed=1), make_adapter(seed=2)
    assert registry.push(a, "x").manifest.version == 1
    again = registry.push(a, "x")
    assert not again.created and again.manifest.version == 1
    assert registry.push(b, "x").manifest.version == 2
    assert registry.push(a, "x", force=True).manifest.version == 3
    assert registry.version_numbers("x") == [1, 2, 3]
    assert registry.aliases("x") == {"latest": 3}
    assert registry.names() == ["x"]


def test_aliases_move_with_history_and_roll_back(registry, make_adapter):
    for seed in range(3):
        registry.push(make_adapter(seed=seed), "m", alias="candidate" if seed == 2 else None)
    assert registry.aliases("m") == {"latest": 3, "candidate": 3}
    registry.tag("m@1", "prod")
    registry.tag("m@2", "prod")
    assert registry.resolve("m@prod").version == 2
    hist = registry.alias_history("m", "prod")
    assert [(e.previous, e.version, e.action) for e in hist] == [(None, 1, "tag"), (1, 2, "tag")]
    assert all(e.at.endswith("Z") and e.by for e in hist)
    ev = registry.rollback("m", "prod")
    assert (ev.previous, ev.version, ev.action) == (2, 1, "rollback")
    assert registry.resolve("m@prod").version == 1
    registry.tag("m@candidate", "prod")  # an alias may be given by another alias
    assert registry.resolve("m@prod").version == 3
    assert registry.alias_history("m", "candidate")[0].action == "push"


def test_alias_errors(registry, make_adapter):
    registry.push(make_adapter(), "m")
    with pytest.raises(ConflictError, match="'latest' always follows"):
        registry.tag("m@1", "latest")
    with pytest.raises(NotFoundError, match="m@9 not found"):
        registry.tag("m@9", "prod")
    with pytest.raises(NotFoundError, match="has no alias 'prod'"):
        registry.resolve("m@prod")
    registry.tag("m@1", "prod")
    with pytest.raises(ConflictError, match="no earlier version to roll back to"):
        registry.rollback("m", "prod")


def test_unknown_names_are_not_found(registry):
    for ref in ("ghost", "ghost@1", "ghost@prod"):
        with pytest.raises(NotFoundError, match="adapter 'ghost' not found|ghost@1 not found"):
            registry.resolve(ref)


def test_rm_refuses_aliased_versions_and_never_reuses_numbers(registry, make_adapter):
    registry.push(make_adapter(seed=1), "m")
    registry.push(make_adapter(seed=2), "m", alias="prod")
    with pytest.raises(ConflictError, match="pointed at by alias prod"):
        registry.remove("m@2")
    with pytest.raises(ConflictError, match="explicit version"):
        registry.remove("m@prod")
    registry.remove("m@2", force=True)
    assert registry.version_numbers("m") == [1]
    assert "prod" not in registry.aliases("m")
    assert registry.alias_history("m", "prod")[-1].action == "rm"
    with pytest.raises(NotFoundError):
        registry.resolve("m@2")
    assert registry.push(make_adapter(seed=3), "m").manifest.version == 3
    registry.remove("m@1")
    registry.remove("m@3")
    assert registry.names() == []
    assert registry.push(make_adapter(seed=4), "m").manifest.version == 4


def test_pull_is_byte_identical_verified_and_cached(registry, make_adapter, tmp_path):
    folder = make_adapter(r=8)
    registry.push(folder, "m", alias="prod")
    m = registry.pull("m@prod", tmp_path / "out")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "out" / f).read_bytes() == (folder / f).read_bytes()
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["version"] == m.version
    # The second fetch comes from the content-addressed cache without touching storage.
    reads = []
    original = registry.storage.download
    registry.storage.download = lambda *a, **k: reads.append(a) or original(*a, **k)
    _, cached = registry.fetch("m@1")
    assert reads == [] and cached == registry.cache.folder_for(m)
    # Editing the pulled copy never touches the cache.
    (tmp_path / "out" / "adapter_model.safetensors").write_bytes(b"scribble")
    assert (cached / "adapter_model.safetensors").read_bytes() == (folder / "adapter_model.safetensors").read_bytes()


def test_same_bytes_under_two_names_share_cache_blobs(registry, make_adapter):
    folder = make_adapter()
    registry.push(folder, "a")
    registry.push(folder, "b")
    _, fa = registry.fetch("a")
    _, fb = registry.fetch("b")
    assert fa == fb
    assert len(list((registry.cache.root / "blobs").iterdir())) == 2


def test_corrupt_stored_file_is_refused_on_pull(registry, make_adapter, tmp_path):
    folder = make_adapter()
    registry.push(folder, "m")
    data = bytearray((folder / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    registry.storage.write("m/v1/adapter_model.safetensors", bytes(data))
    with pytest.raises(IntegrityError, match="does not match its manifest"):
        registry.pull("m@1", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list((registry.cache.root / "adapters").iterdir())


def test_unpublished_claim_is_invisible_and_skipped(registry, make_adapter):
    """What a push killed after claiming v1 and uploading half its files leaves behind."""
    registry.storage.create("m/v1/.claim", b"{}")
    registry.storage.write("m/v1/adapter_config.json", b"{}")
    assert registry.names() == [] and registry.version_numbers("m") == []
    with pytest.raises(NotFoundError):
        registry.resolve("m")
    assert registry.push(make_adapter(), "m").manifest.version == 2


def test_concurrent_alias_moves_are_all_recorded(registry, make_adapter):
    for seed in range(4):
        registry.push(make_adapter(seed=seed), "m")

    def move(i: int):
        return AdapterRegistry(registry.uri).tag(f"m@{i % 4 + 1}", "prod")

    with ThreadPoolExecutor(8) as pool:
        events = list(pool.map(move, range(8)))
    hist = registry.alias_history("m", "prod")
    assert len(hist) == 8
    # The log is a chain: every entry's 'previous' is the entry before it.
    assert [e.previous for e in hist] == [None] + [e.version for e in hist[:-1]]
    assert sorted(e.version for e in events) == sorted(e.version for e in hist)


def test_base_fingerprint_check(registry, make_adapter, base_dir):
    m = registry.push(make_adapter(), "m", base_model=str(base_dir)).manifest
    registry.check_base(m, BaseModelInfo.from_dict(m.base_fingerprint))
    with pytest.raises(IncompatibleBaseError, match="was made for base model tiny-llama"):
        registry.check_base(m, SMOLLM2_135M)


def test_unknown_base_is_recorded_without_fingerprint(registry, make_adapter):
    m = registry.push(make_adapter(), "m", base_model="someone/unknown-model").manifest
    assert m.base_model == "someone/unknown-model" and m.base_fingerprint is None


def test_registries_do_not_see_each_other(registry_uri, tmp_path, make_adapter):
    """Two registry roots (two prefixes / folders) are independent."""
    other_uri = registry_uri.replace("/registry", "/other")
    a, b = AdapterRegistry(registry_uri), AdapterRegistry(other_uri)
    a.push(make_adapter(), "m")
    assert b.names() == []


# ---- S3 faults ---------------------------------------------------------------------------------


def test_s3_down_is_a_clear_storage_error(make_adapter, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    reg = AdapterRegistry(f"s3://bucket/p?endpoint_url=http://127.0.0.1:{free_port()}&region=us-east-1")
    t = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach S3 at http://127.0.0.1"):
        reg.push(make_adapter(), "m")
    with pytest.raises(StorageError, match="cannot reach S3"):
        reg.resolve("m")
    assert time.monotonic() - t < 60  # bounded retries, not a hang


def test_s3_wrong_credentials_and_missing_bucket(seaweed, make_adapter, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "loraplex-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    bucket = seaweed.make_bucket("creds-check")
    reg = AdapterRegistry(f"s3://{bucket}/r?endpoint_url={seaweed.endpoint}&region=us-east-1")
    with pytest.raises(StorageError, match="refused access .* check the credentials"):
        reg.names()
    for k, v in seaweed.env().items():
        monkeypatch.setenv(k, v)
    reg = AdapterRegistry(f"s3://no-such-bucket/r?endpoint_url={seaweed.endpoint}&region=us-east-1")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        reg.push(make_adapter(), "m")


def test_cache_folder_is_complete_or_absent(registry, make_adapter, tmp_path):
    registry.push(make_adapter(), "m")
    cache = AdapterCache(tmp_path / "c2")
    m = registry.resolve("m")
    folder = cache.materialize(registry.storage, m)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not [p for p in (tmp_path / "c2" / "adapters").iterdir() if p.name.startswith(".tmp")]
    assert isinstance(folder, Path)
