"""The vLLM backend's adapter side, without vLLM: derived adapters (mixtures, merges) as PEFT folders
with the exact deltas, cached by hash; checks against the base; stable ids."""

from __future__ import annotations

import pytest
import torch

from loraplex.adapters import AdapterCache, AdapterRegistry, BaseModelInfo
from loraplex.adapters.errors import IncompatibleBaseError, InvalidAdapterError, NotFoundError
from engine_fixtures import ADAPTERS, TINY, make_peft_adapters
from loraplex.server.lora.merge import MergeSpec, merge
from loraplex.server.lora.weights import LoraWeights
from loraplex.server.vllm.catalog import AdapterCatalog
from loraplex.server.vllm.derived import DerivedStore, write_peft

INFO = BaseModelInfo.from_hf_config("tiny", {**TINY, "model_type": "llama"})


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_peft_adapters(tmp_path_factory.mktemp("peft"))


@pytest.fixture
def catalog(folders, tmp_path):
    reg = AdapterRegistry((tmp_path / "registry").as_uri(), cache=AdapterCache(tmp_path / "cache"))
    for name, folder in folders.items():
        reg.push(folder, name)
    return AdapterCatalog(reg, INFO, 32, DerivedStore(tmp_path / "derived", "tiny"))


def deltas(w: LoraWeights) -> dict:
    return {k: m.delta_weight() for k, m in w.modules.items()}


def test_write_peft_keeps_every_delta(folders, tmp_path):
    """A cat mixture of three adapters (different ranks, modules and rsLoRA) written as one PEFT
    folder and loaded back: every module's delta is sum w_i delta_i. Its rank is the largest summed
    rank of any module (o_proj: 8 + 16), the others zero-padded."""
    sources = [LoraWeights.load(folders[n], n) for n in ("qv4", "all8", "mlp16rs")]
    weights = (0.5, -0.3, 1.2)
    mixed = merge(sources, MergeSpec("cat", weights))
    back = LoraWeights.load(write_peft(mixed, tmp_path / "mix"), "mix")
    assert back.rank == 24 and set(back.modules) == {k for s in sources for k in s.modules}
    got = deltas(back)
    for key in got:
        want = sum(w * s.modules[key].delta_weight() for s, w in zip(sources, weights) if key in s.modules)
        torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-6)


def test_mixtures_are_derived_once_and_named_by_hash(catalog):
    one = catalog.resolve([("qv4@1", 0.7), ("all8@1", 0.3)])
    again = catalog.resolve([("qv4@1", 0.7), ("all8@1", 0.3)])
    other = catalog.resolve([("qv4@1", 0.3), ("all8@1", 0.7)])
    assert one == again and one.name.startswith("mix-") and one.rank == 12
    assert other.name != one.name and other.folder != one.folder
    assert catalog.lora_id(one) == catalog.lora_id(again) != catalog.lora_id(other)
    assert catalog.lora_id(catalog.check("qv4@1")) == catalog.lora_id(catalog.check("qv4@1"))
    # a single adapter at weight 1 is served as itself; at another weight it is derived (same rank)
    assert catalog.resolve([("qv4@1", 1.0)]).name == "qv4@1"
    scaled = catalog.resolve([("qv4@1", 0.5)])
    assert scaled.name.startswith("mix-") and scaled.rank == 4


def test_merge_names_match_the_native_engine(catalog):
    spec = {"strategy": "svd", "weights": [0.6, 0.4], "svd_rank": 8}
    name = catalog.add_merge(["qv4@1", "all8@1"], spec)
    assert name == f"merge-{MergeSpec.from_request(spec).cache_key(['qv4@1', 'all8@1'])[:20]}"
    assert catalog.resolve([(name, 1.0)]).rank == 8
    with pytest.raises(InvalidAdapterError, match="ranks"):  # ties needs one rank
        catalog.add_merge(["qv4@1", "all8@1"], {"strategy": "ties", "weights": [0.5, 0.5], "density": 0.5})


def test_bad_adapters_are_refused_before_vllm_sees_them(catalog, folders, tmp_path):
    doubled = catalog.add_merge(["all8@1"], {"strategy": "linear", "weights": [2.0]})  # rank 8
    with pytest.raises(InvalidAdapterError, match=r"summed rank 36 \(16 \+ 8 \+ 4 \+ 8\)"):
        catalog.resolve([("mlp16rs@1", 0.5), ("all8@1", 0.3), ("qv4@1", 0.1), (doubled, 0.1)])
    with pytest.raises(ValueError, match="twice"):
        catalog.resolve([("qv4@1", 0.5), ("qv4@1", 0.5)])
    with pytest.raises(NotFoundError):
        catalog.check("ghost@1")
    wide = make_peft_adapters(tmp_path / "wide", specs={"w": dict(r=4, lora_alpha=8, target_modules=["q_proj"])},
                              dims={"num_hidden_layers": 3})
    with pytest.raises(InvalidAdapterError):  # a folder for a 3-layer base
        catalog.check(str(wide["w"]))
    catalog.registry.push(wide["w"], "foreign", base_model=None)
    small = AdapterCatalog(catalog.registry, INFO, 8, catalog.derived)
    with pytest.raises(InvalidAdapterError, match="rank 16, above max_lora_rank 8"):
        small.check("mlp16rs@1")
    with pytest.raises((IncompatibleBaseError, InvalidAdapterError)):
        small.check("foreign@1")


# ---- bounds: derived adapters (folders, ids) and checked adapters ------------------------------------------
@pytest.fixture
def bounded(folders, tmp_path):
    """A catalog that keeps at most 3 derived adapters; the ids it tells vLLM to drop are in ``evicted``."""
    reg = AdapterRegistry((tmp_path / "registry").as_uri(), cache=AdapterCache(tmp_path / "cache"))
    for name, folder in folders.items():
        reg.push(folder, name)
    evicted: list[int] = []
    cat = AdapterCatalog(reg, INFO, 32, DerivedStore(tmp_path / "derived", "tiny"), max_derived=3,
                         on_evict=evicted.append)
    cat.evicted = evicted
    return cat


def mix(w: float) -> list[tuple[str, float]]:
    return [("qv4@1", w), ("all8@1", 1 - w)]


def test_derived_adapters_are_bounded_and_rebuilt(bounded):
    """More distinct mixtures than the bound: at most 3 folders on disk, the least recently used evicted
    (folder deleted, id dropped and told to vLLM); one asked again is rebuilt, same bytes, a new id."""
    first = bounded.resolve(mix(0.1))
    first_id = bounded.lora_id(first)
    first_bytes = (first.folder / "adapter_model.safetensors").read_bytes()
    ids = {first_id}
    for i in range(2, 8):
        ids.add(bounded.lora_id(bounded.resolve(mix(i / 10))))
        on_disk = bounded.derived.names()
        assert len(on_disk) <= 3 and on_disk == sorted(bounded.derived_names())
    assert len(ids) == 7  # one id each
    assert not first.folder.exists() and first.name not in bounded.derived_names()
    assert sorted(bounded.evicted) == sorted(ids)[:4]  # the 4 oldest, each told once
    again = bounded.resolve(mix(0.1))
    assert again.name == first.name and again.folder.is_dir() and len(bounded.derived.names()) == 3
    assert (again.folder / "adapter_model.safetensors").read_bytes() == first_bytes
    assert bounded.lora_id(again) not in ids  # an id is never reused


def test_a_held_derived_adapter_is_not_evicted(bounded):
    """A derived adapter a request holds (``resolve(hold=True)``) outlives any number of others; released,
    it is evicted like the others once it is the least recently used."""
    held = bounded.resolve(mix(0.15), hold=True)
    for i in range(1, 6):
        bounded.resolve(mix(i / 10))
        assert held.folder.is_dir() and held.name in bounded.derived_names()
        assert len(bounded.derived.names()) <= 4  # the bound, plus the one held
    twice = bounded.resolve(mix(0.15), hold=True)  # a second request on it
    bounded.release(held)
    bounded.resolve(mix(0.6))
    assert twice.folder.is_dir()
    bounded.release(twice)
    for w in (0.7, 0.8, 0.9):
        bounded.resolve(mix(w))
    assert not twice.folder.exists() and len(bounded.derived.names()) == 3
    bounded.release(bounded.check("qv4@1"))  # releasing an adapter that is not derived is a no-op


def test_a_merge_evicted_is_rebuilt_by_its_name(bounded):
    """A request carries only a merge's name from ``add_merge`` to the engine: evicted in between, the name
    still resolves (rebuilt from its recipe)."""
    name = bounded.add_merge(["qv4@1", "all8@1"], {"strategy": "svd", "weights": [0.5, 0.5], "svd_rank": 8})
    for i in range(1, 5):
        bounded.resolve(mix(i / 10))
    assert name not in bounded.derived_names()
    back = bounded.resolve([(name, 1.0)])
    assert back.name == name and back.folder.is_dir() and back.rank == 8


def test_checked_adapters_are_bounded(folders, tmp_path):
    reg = AdapterRegistry((tmp_path / "registry").as_uri(), cache=AdapterCache(tmp_path / "cache"))
    for name, folder in folders.items():
        reg.push(folder, name)
    cat = AdapterCatalog(reg, INFO, 32, DerivedStore(tmp_path / "derived"), max_known=2)
    ids = {n: cat.lora_id(cat.check(f"{n}@1")) for n in folders}
    assert len(folders) > 2 and len(cat._known) == 2
    assert {n: cat.lora_id(cat.check(f"{n}@1")) for n in folders} == ids  # checked again, same ids


def test_a_new_store_deletes_what_ended_runs_left(tmp_path):
    """Derived folders are a cache of one run: a new store deletes those of runs that ended (their lock is
    free) and older versions' folders, never a live store's."""
    live = DerivedStore(tmp_path, "tiny")
    (live.dir / "mix-live").mkdir()
    (tmp_path / "run-1-dead").mkdir()
    (tmp_path / "run-1-dead" / "mix-old").mkdir()
    (tmp_path / "run-1-dead.lock").touch()
    (tmp_path / "run-2-nolock").mkdir()
    (tmp_path / "merge-legacy").mkdir()
    new = DerivedStore(tmp_path, "tiny")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([".lock", live.dir.name, f"{live.dir.name}.lock", new.dir.name, f"{new.dir.name}.lock"])
    assert (live.dir / "mix-live").is_dir()
    new.close()
    live.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_vllm_prefix_cache_keys_differ_per_version_and_per_folder_content(catalog, folders, tmp_path):
    """vLLM hashes a cached block with its LoRA's name and path (vllm.v1.core.kv_cache_utils): two versions of
    one name, and a folder whose weights changed, must give different keys, so vLLM never reuses blocks one
    of them computed for the other; identical bytes behind two versions may share (same path)."""
    pytest.importorskip("vllm")
    import os
    import shutil

    from loraplex.server.vllm.launch import VllmLaunch

    catalog.registry.push(folders["all8"], "qv4", force=True)  # qv4@2: other weights under the same name
    keys = {}
    for ref in ("qv4@1", "qv4@2"):
        r = catalog.lora_request(catalog.check(ref))
        keys[ref] = (r.lora_name, r.lora_path, r.lora_int_id)
    assert keys["qv4@1"][:2] != keys["qv4@2"][:2] and keys["qv4@1"][2] != keys["qv4@2"][2]
    folder = tmp_path / "live"
    shutil.copytree(folders["qv4"], folder)
    before = catalog.lora_request(catalog.check(str(folder)))
    shutil.copy(folders["all8"] / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    st = (folder / "adapter_model.safetensors").stat()
    os.utime(folder / "adapter_model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later write
    shutil.copy(folders["all8"] / "adapter_config.json", folder / "adapter_config.json")
    after = catalog.lora_request(catalog.check(str(folder)))
    assert before.lora_path == after.lora_path and before.lora_name != after.lora_name
    assert VllmLaunch(model=tmp_path).engine_args().enable_prefix_caching is True
    assert VllmLaunch(model=tmp_path, prefix_caching=False).engine_args().enable_prefix_caching is False
