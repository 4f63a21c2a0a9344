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
