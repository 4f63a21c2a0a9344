"""Registry integrity (issue 12): nothing read from the store is trusted, nothing cached is trusted forever.

Every test that touches storage runs against a folder registry and a real SeaweedFS S3 bucket. Failure
modes covered, one per test name:

* a tampered manifest (path-like or extra file names, bad sha256 strings, negative or huge sizes, wrong
  name or version, wrong types, broken JSON) is an IntegrityError with one line, and writes no file
  outside the cache (nor any folder in it);
* a stored blob larger than its manifest says is refused before reading past the cap; a truncated or
  corrupted one is refused after hashing; nothing half-written is ever visible in the cache;
* a damaged cache entry (bit flip, bit flip with mtime restored, truncation, deletion, replacement,
  symlink) is detected on the next fetch and healed from the store (or from its intact blob).

``test_registry_guards.py`` covers the rest of the registry's integrity: ``rm`` and route arms, removed
versions, the conditional-write probe.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pytest

from loraplex.adapters import AdapterCache, AdapterRegistry, IntegrityError
from loraplex.adapters.manifest import MAX_MANIFEST_BYTES, Manifest
from loraplex.adapters.spec import CONFIG_FILE, WEIGHTS_FILE, Limits
from loraplex.adapters.storage import copy_capped

KEY = "m/v1/manifest.json"


def _sandbox(tmp_path: Path) -> tuple[Path, AdapterCache]:
    """A folder holding only the cache; anything else appearing in it escaped the cache."""
    root = tmp_path / "sandbox"
    (root / "outside").mkdir(parents=True)
    return root, AdapterCache(root / "cache")


def _escaped(root: Path) -> list[str]:
    cache = root / "cache"
    return [str(p) for p in root.rglob("*") if p != cache and cache not in p.parents and p != root / "outside"]


def _store_manifest(registry: AdapterRegistry, change: Callable[[dict], dict | bytes | None]) -> None:
    data = json.loads(registry.storage.read(KEY))
    out = change(data)
    raw = out if isinstance(out, bytes) else json.dumps(data if out is None else out).encode()
    registry.storage.write(KEY, raw)


def _files(d: dict) -> dict:
    return d["files"]


def _rename(old: str, new: str):
    def change(d):
        _files(d)[new] = _files(d).pop(old)
    return change


def _set(path: tuple, value):
    def change(d):
        target = d
        for k in path[:-1]:
            target = target[k]
        target[path[-1]] = value
    return change


TAMPERED = [
    # (id, change, expected message after "manifest m@1 is ")
    ("absolute-file-name", None, "invalid: file name '/.*' is not one of the adapter's files"),
    ("dotdot-file-name", _rename(CONFIG_FILE, "../../../outside/x"), "invalid: file name '../../../outside/x' is not one of"),
    ("separator-in-file-name", _rename(CONFIG_FILE, "sub/adapter_config.json"), "invalid: file name 'sub/adapter_config.json'"),
    ("extra-file", lambda d: _files(d).__setitem__("notes.txt", dict(_files(d)[CONFIG_FILE])), "invalid: file name 'notes.txt'"),
    ("missing-file", lambda d: _files(d).pop(CONFIG_FILE) and None, "invalid: files lack adapter_config.json"),
    ("files-not-an-object", _set(("files",), ["adapter_config.json"]), "invalid: files must be an object"),
    ("extra-key-in-file-entry", _set(("files", WEIGHTS_FILE, "path"), "/etc/passwd"), "expected exactly sha256 and size"),
    ("sha256-path-traversal", _set(("files", WEIGHTS_FILE, "sha256"), "../../outside/blob"), "sha256 must be 64 lowercase hex digits"),
    ("sha256-uppercase", lambda d: _set(("files", WEIGHTS_FILE, "sha256"), _files(d)[WEIGHTS_FILE]["sha256"].upper())(d),
     "sha256 must be 64 lowercase hex digits"),
    ("sha256-too-short", lambda d: _set(("files", WEIGHTS_FILE, "sha256"), _files(d)[WEIGHTS_FILE]["sha256"][:63])(d),
     "sha256 must be 64 lowercase hex digits"),
    ("sha256-not-a-string", _set(("files", CONFIG_FILE, "sha256"), 12), "sha256 must be 64 lowercase hex digits, got 12"),
    ("negative-size", _set(("files", WEIGHTS_FILE, "size"), -1), "size must be a non-negative integer, got -1"),
    ("huge-size", _set(("files", WEIGHTS_FILE, "size"), 2**62), f"size {2**62} is above the limit of {Limits().max_bytes} bytes"),
    ("config-size-above-its-limit", _set(("files", CONFIG_FILE, "size"), 10**7), f"above the limit of {Limits().max_config_bytes}"),
    ("boolean-size", _set(("files", WEIGHTS_FILE, "size"), True), "size must be a non-negative integer, got True"),
    ("float-size", _set(("files", WEIGHTS_FILE, "size"), 12.5), "size must be a non-negative integer, got 12.5"),
    ("wrong-name", _set(("name",), "other"), "invalid: it names adapter 'other' but is stored under 'm'"),
    ("invalid-name", _set(("name",), "../x"), "invalid: name '../x' is not a valid adapter name"),
    ("wrong-version", _set(("version",), 2), "invalid: it names version 2 but is stored as version 1"),
    ("missing-field", lambda d: d.pop("rank") and None, "invalid: missing field 'rank'"),
    ("wrong-field-type", _set(("rank",), "8"), "invalid: rank must be a positive integer, got '8'"),
    ("content-hash-mismatch", _set(("content_sha256",), "0" * 64), "invalid: content_sha256 .* does not match its files"),
    ("fingerprint-mismatch", _set(("base_fingerprint", "hidden_size"), 128), "base_fingerprint.fingerprint .* does not match"),
    ("newer-format", _set(("format_version",), 99), "format_version 99 is newer than this loraplex reads"),
    ("terminal-escape-in-message", _set(("message",), "ok\x1b]0;pwned\x07"), "invalid: message must be text of at most"),
    ("huge-message", _set(("message",), "x" * 10_000), "invalid: message must be text of at most"),
    ("newline-in-creator", _set(("creator",), "me\nroot@host"), "invalid: creator must be a string of printable"),
    ("huge-base-model", _set(("base_model",), "b" * 5000), "invalid: base_model must be a string of printable"),
    ("huge-training", _set(("training",), {"x": "y" * 300_000}), "invalid: training must be an object of at most"),
    ("not-json", lambda d: b"{not json", "unreadable: "),
    ("not-an-object", lambda d: b"[1, 2]", "invalid: expected a JSON object, got list"),
    ("deeply-nested", lambda d: b"[" * 100_000 + b"]" * 100_000, "unreadable: "),
]


@pytest.mark.parametrize("case_id,change,expected", TAMPERED, ids=[c[0] for c in TAMPERED])
def test_tampered_manifest_is_an_integrity_error_and_writes_nothing_outside_the_cache(
        case_id, change, expected, registry, make_adapter, base_dir, tmp_path):
    registry.push(make_adapter(), "m", base_model=str(base_dir))
    root, cache = _sandbox(tmp_path)
    if change is None:  # absolute-file-name: a path in this test's sandbox, outside the cache
        change = _rename(WEIGHTS_FILE, str(root / "outside" / "evil"))
    _store_manifest(registry, change)
    reader = AdapterRegistry(registry.uri, cache=cache)  # a fresh client: nothing memoized
    for ref in ("m@1", "m"):
        with pytest.raises(IntegrityError) as info:
            reader.fetch(ref)
        message = str(info.value)
        assert "\n" not in message and message.startswith("manifest m@1 is "), message
        assert re.search(expected, message), message
    assert _escaped(root) == []
    assert not (root / "cache" / "adapters").exists() or not list((root / "cache" / "adapters").iterdir())


def test_oversized_manifest_is_refused_without_parsing(registry, make_adapter):
    """Failure mode: a manifest padded to megabytes (memory, parse time) is refused by size on the read."""
    registry.push(make_adapter(), "m")
    _store_manifest(registry, lambda d: {**d, "message": "x" * (MAX_MANIFEST_BYTES + 1)})
    with pytest.raises(IntegrityError, match=f"manifest m@1 is invalid: larger than {MAX_MANIFEST_BYTES} bytes"):
        AdapterRegistry(registry.uri).resolve("m@1")


def test_manifest_built_in_code_with_a_path_name_cannot_escape_the_cache(registry, make_adapter, tmp_path):
    """Failure mode: a Manifest object made without from_json (bypassing validation) still cannot make paths."""
    m = registry.push(make_adapter(), "m").manifest
    root, cache = _sandbox(tmp_path)
    files = dict(m.files)
    files["../../outside/x"] = files.pop(CONFIG_FILE)
    bad = Manifest(**{**{k: getattr(m, k) for k in m.__dataclass_fields__}, "files": files})
    with pytest.raises(IntegrityError, match="must be exactly"):
        cache.materialize(registry.storage, bad)
    assert _escaped(root) == []


def test_unreadable_alias_entry_is_an_integrity_error(registry, make_adapter):
    """Failure mode: a tampered alias log entry is a one-line IntegrityError, not a traceback."""
    registry.push(make_adapter(), "m", alias="prod")
    registry.storage.write("m/aliases/prod/0000000001.json", b'{"alias": "prod", "evil": 1}')
    with pytest.raises(IntegrityError, match="alias entry m/aliases/prod/0000000001.json is unreadable"):
        registry.resolve("m@prod")


# ---- downloads: capped, verified, never half-visible -----------------------------------------------
def _counting(seen: list[int]):
    @contextmanager
    def factory(label, total):
        yield seen.append
    return factory


def test_blob_larger_than_its_manifest_is_refused_without_reading_past_the_cap(
        registry, backend, make_adapter, tmp_path, monkeypatch):
    """Failure mode: a stored weights file padded by 8 MiB (a download bomb) past the size its manifest gives."""
    folder = make_adapter()
    m = registry.push(folder, "m").manifest
    registry.storage.write(f"m/v1/{WEIGHTS_FILE}", (folder / WEIGHTS_FILE).read_bytes() + b"\0" * (8 << 20))
    pulled: list[int] = []
    if backend == "s3":  # count what boto actually read off the socket
        import botocore.response

        original = botocore.response.StreamingBody.read

        def read(self, amt=None):
            data = original(self, amt)
            pulled.append(len(data))
            return data

        monkeypatch.setattr(botocore.response.StreamingBody, "read", read)
    root, cache = _sandbox(tmp_path)
    seen: list[int] = []
    with pytest.raises(IntegrityError) as info:
        cache.materialize(registry.storage, m, _counting(seen))
    assert str(info.value) == (f"m@1 {WEIGHTS_FILE} is larger than its manifest says ({m.files[WEIGHTS_FILE].size} bytes): "
                               "the stored copy is corrupt or was tampered with; refused without reading past that size")
    assert sum(seen) <= m.size + 1
    assert sum(pulled) <= m.size + 1
    # nothing half-written is visible: no blob for the weights, no folder, no temporary file left behind
    assert sorted(p.name for p in (root / "cache" / "blobs").iterdir()) == [m.files[CONFIG_FILE].sha256]
    assert list((root / "cache" / "adapters").iterdir()) == []
    assert _escaped(root) == []


@pytest.mark.parametrize("damage", ["truncated", "bit-flip"])
def test_stored_blob_that_does_not_hash_to_its_manifest_is_refused(registry, make_adapter, tmp_path, damage):
    """Failure modes: a stored weights file cut short, or of the right size with one byte changed."""
    folder = make_adapter()
    m = registry.push(folder, "m").manifest
    data = bytearray((folder / WEIGHTS_FILE).read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[-1] ^= 0xFF
    registry.storage.write(f"m/v1/{WEIGHTS_FILE}", bytes(data))
    root, cache = _sandbox(tmp_path)
    with pytest.raises(IntegrityError, match=f"m@1 {WEIGHTS_FILE} does not match its manifest .*: the stored copy is corrupt"):
        cache.materialize(registry.storage, m)
    assert not (root / "cache" / "blobs" / m.files[WEIGHTS_FILE].sha256).exists()
    assert [p.name for p in (root / "cache" / "blobs").iterdir() if p.name.startswith(".tmp")] == []
    assert list((root / "cache" / "adapters").iterdir()) == []


def test_storage_reads_stop_one_byte_past_the_limit(registry):
    """Failure mode: a read or download larger than its limit, on each backend (limit exactly met is fine)."""
    registry.storage.write("k/blob", b"x" * 1000)
    assert registry.storage.read("k/blob", limit=1000) == b"x" * 1000
    with pytest.raises(IntegrityError, match="k/blob is larger than 999 bytes"):
        registry.storage.read("k/blob", limit=999)


def test_capped_copy_of_an_endless_stream_reads_at_most_limit_plus_one(tmp_path):
    """Failure mode: a stream whose length was not announced (or lied about) and never ends."""
    asked: list[int] = []

    def endless(n: int) -> bytes:
        asked.append(n)
        return b"x" * min(n, 7)  # short reads, as sockets give

    out = io.BytesIO()
    with pytest.raises(IntegrityError, match="k is larger than 1000 bytes"):
        copy_capped(endless, out, "k", 1000, chunk=64)
    assert sum(min(n, 7) for n in asked) == 1001 and len(out.getvalue()) <= 1000


# ---- cached entries are re-verified and healed ------------------------------------------------------
def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))  # in place: the same inode, so the blob it is linked to is corrupted too


def _flip_keep_mtime(p: Path) -> None:
    st = p.stat()
    _flip(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:100])


def _replace(p: Path) -> None:
    other = p.with_name("other")
    other.write_bytes(b"\0" * p.stat().st_size)
    os.replace(other, p)  # a new inode: the blob stays intact


def _symlink(p: Path) -> None:
    target = p.parent.parent.parent.parent / "outside-copy"
    shutil.copyfile(p, target)
    p.unlink()
    p.symlink_to(target)


DAMAGE = [  # (id, file, damage, needs a new download)
    ("bit-flip-in-place", WEIGHTS_FILE, _flip, True),
    ("bit-flip-with-mtime-restored", WEIGHTS_FILE, _flip_keep_mtime, True),
    ("config-bit-flip", CONFIG_FILE, _flip, True),
    ("truncated", WEIGHTS_FILE, _truncate, True),
    ("deleted", WEIGHTS_FILE, lambda p: p.unlink(), False),
    ("replaced-by-another-file", WEIGHTS_FILE, _replace, False),
    ("replaced-by-a-symlink", CONFIG_FILE, _symlink, False),
]


@pytest.mark.parametrize("case_id,fname,damage,downloads", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_cache_entry_is_detected_and_healed_on_next_fetch(
        case_id, fname, damage, downloads, registry, make_adapter, monkeypatch):
    folder = make_adapter()
    registry.push(folder, "m")
    _, cached = registry.fetch("m@1")
    damage(cached / fname)
    fetched: list[str] = []
    original = registry.storage.download
    monkeypatch.setattr(registry.storage, "download", lambda key, *a, **k: fetched.append(key) or original(key, *a, **k))
    m, healed = registry.fetch("m@1")
    assert healed == cached
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        assert not (healed / f).is_symlink()
        assert (healed / f).read_bytes() == (folder / f).read_bytes()
    assert (fetched == [f"m/v1/{fname}"]) if downloads else (fetched == [])
    assert [p for p in (registry.cache.root / "adapters").iterdir() if p.name.startswith(".tmp")] == []
    # healed for good: the next fetch is a plain warm hit
    fetched.clear()
    before = registry.cache.hashes
    registry.fetch("m@1")
    assert fetched == [] and registry.cache.hashes == before


def test_warm_fetch_checks_sizes_only_and_first_use_in_a_process_hashes(registry, make_adapter):
    """The documented cost: sha256 once per cache object (process) and file, then only lstat while unchanged."""
    registry.push(make_adapter(), "m")
    registry.fetch("m@1")
    before = registry.cache.hashes
    for _ in range(3):
        registry.fetch("m@1")
    assert registry.cache.hashes == before  # warm: no hashing
    restarted = AdapterRegistry(registry.uri, cache=AdapterCache(registry.cache.root))  # a new process, in effect
    restarted.fetch("m@1")
    assert restarted.cache.hashes == 2  # both files hashed on first use
    restarted.fetch("m@1")
    assert restarted.cache.hashes == 2


def test_damage_found_by_a_new_process_is_healed(registry, make_adapter):
    """Failure mode: the cache was corrupted while no server ran; the next process hashes and heals it."""
    folder = make_adapter()
    registry.push(folder, "m")
    _, cached = registry.fetch("m@1")
    _flip(cached / WEIGHTS_FILE)
    restarted = AdapterRegistry(registry.uri, cache=AdapterCache(registry.cache.root))
    _, healed = restarted.fetch("m@1")
    assert (healed / WEIGHTS_FILE).read_bytes() == (folder / WEIGHTS_FILE).read_bytes()
