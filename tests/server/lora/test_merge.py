"""server.lora.merge against PEFT's add_weighted_adapter on a tiny in-process Llama."""

from __future__ import annotations

import itertools
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

from loraplex.adapters.errors import InvalidAdapterError  # noqa: E402
from loraplex.server.lora.merge import STRATEGIES, InvalidMergeError, MergeSpec, merge  # noqa: E402
from loraplex.server.lora.weights import LoraModule, LoraWeights, ModuleKey  # noqa: E402

ATOL, RTOL = 1e-5, 1e-4
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name: (r, lora_alpha, target_modules)
ADAPTERS = {
    "x": (4, 8, ALL),
    "y": (8, 12, ALL),
    "z": (4, 4, ALL),
    "w": (4, 16, ["q_proj", "v_proj", "down_proj"]),
}
_merged = itertools.count()


def _layer_modules(model):
    for path, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and ".layers." in path:
            parts = path.split(".")
            layer = int(parts[parts.index("layers") + 1])
            yield ModuleKey(layer, parts[-1]), mod


def _weights_from_peft(model, adapter: str) -> LoraWeights:
    mods = {}
    for key, layer in _layer_modules(model):
        if adapter in layer.lora_A:
            mods[key] = LoraModule(layer.lora_A[adapter].weight.detach().clone(),
                                   layer.lora_B[adapter].weight.detach().clone(), layer.scaling[adapter])
    return LoraWeights(adapter, dict(sorted(mods.items())))


@pytest.fixture(scope="module")
def peft_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    base = LlamaForCausalLM(cfg).float()
    model = None
    for name, (r, alpha, targets) in ADAPTERS.items():
        conf = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
        if model is None:
            model = get_peft_model(base, conf, adapter_name=name)
        else:
            model.add_adapter(name, conf)
    with torch.no_grad():
        for _, layer in _layer_modules(model):
            for name in layer.lora_A:
                layer.lora_A[name].weight.copy_(torch.randn_like(layer.lora_A[name].weight) * 0.2)
                layer.lora_B[name].weight.copy_(torch.randn_like(layer.lora_B[name].weight) * 0.2)
    return model


@pytest.fixture(scope="module")
def sources(peft_model):
    return {name: _weights_from_peft(peft_model, name) for name in ADAPTERS}


def _peft_merge(model, names, weights, seed=None, **kw) -> dict[ModuleKey, torch.Tensor]:
    target = f"merged{next(_merged)}"
    if seed is not None:
        torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_weighted_adapter(list(names), list(weights), target, **kw)
    try:
        return {k: layer.get_delta_weight(target).detach().clone()
                for k, layer in _layer_modules(model) if target in layer.lora_A}
    finally:
        model.delete_adapter(target)


CASES = [
    # (adapters, weights, strategy, params)
    (["x", "z"], [0.7, -0.4], "linear", {}),
    (["x", "w"], [1.0, 0.5], "linear", {}),  # different target sets
    (["x", "z", "w"], [0.3, 0.5, -0.8], "linear", {}),
    (["x", "y"], [0.5, 1.3], "cat", {}),
    (["x", "y", "w"], [1.0, -0.6, 0.9], "cat", {}),
    (["x", "y"], [0.5, 1.3], "svd", {}),
    (["x", "y", "w"], [0.5, 1.3, 0.2], "svd", {"svd_rank": 6}),
    (["x", "y"], [0.8, 0.6], "svd", {"svd_rank": 10, "svd_clamp": 0.9}),
    (["x", "z"], [0.7, 0.9], "ties", {"density": 0.5}),
    (["x", "z", "w"], [0.7, -0.9, 0.4], "ties", {"density": 0.3, "majority_sign_method": "frequency"}),
    (["x", "z"], [0.7, 0.9], "magnitude_prune", {"density": 0.6}),
    (["x", "z"], [0.7, 0.9], "dare_linear", {"density": 0.5, "seed": 123}),
    (["x", "z", "w"], [1.2, 0.4, -0.5], "dare_linear", {"density": 0.8, "seed": 5}),
    (["x", "z"], [0.7, 0.9], "dare_ties", {"density": 0.5, "seed": 7}),
    (["x", "z", "w"], [0.7, 0.9, 0.3], "dare_ties", {"density": 0.4, "majority_sign_method": "frequency",
                                                     "seed": 11}),
    (["x", "y"], [0.6, 0.8], "ties_svd", {"density": 0.5}),
    (["x", "y"], [0.6, 0.8], "magnitude_prune_svd", {"density": 0.5, "svd_rank": 5}),
    (["x", "y", "w"], [0.6, 0.8, 0.5], "dare_linear_svd", {"density": 0.6, "seed": 3}),
    (["x", "y"], [0.6, -0.8], "dare_ties_svd", {"density": 0.6, "seed": 4, "svd_clamp": 0.95}),
    (["y"], [0.9], "ties", {"density": 0.3}),  # one adapter: PEFT falls back to linear
    (["y"], [0.9], "svd", {"svd_rank": 2}),  # ... with no SVD truncation either
]


@pytest.mark.parametrize("names,weights,strategy,params", CASES,
                         ids=[f"{c[2]}-{'+'.join(c[0])}-{i}" for i, c in enumerate(CASES)])
def test_matches_peft(peft_model, sources, names, weights, strategy, params):
    spec = MergeSpec(strategy, tuple(weights), **params)
    ours = merge([sources[n] for n in names], spec, name="m")
    peft_kw = {k: v for k, v in params.items() if k != "seed"}
    theirs = _peft_merge(peft_model, names, weights, seed=params.get("seed"), combination_type=strategy, **peft_kw)
    assert set(ours.modules) == set(theirs)
    for key, delta in theirs.items():
        mine = ours.modules[key]
        assert mine.scale == 1.0
        torch.testing.assert_close(mine.delta_weight(), delta, atol=ATOL, rtol=RTOL, msg=f"{strategy} {key}")
    if strategy.startswith("dare"):  # the masks really are random: another seed gives another merge
        other = merge([sources[n] for n in names], MergeSpec(strategy, tuple(weights), **{**params, "seed": 999}))
        assert any(not torch.allclose(other.modules[k].delta_weight(), d) for k, d in theirs.items())


def test_cat_is_exact_weighted_sum(sources):
    ws = (0.5, -1.5)
    out = merge([sources["x"], sources["y"]], MergeSpec("cat", ws))
    for key, m in out.modules.items():
        want = ws[0] * sources["x"].modules[key].delta_weight() + ws[1] * sources["y"].modules[key].delta_weight()
        torch.testing.assert_close(m.delta_weight(), want, atol=ATOL, rtol=RTOL)
        assert m.rank == 12
    # where d lacks a module, only the carrying sources are concatenated
    out = merge([sources["x"], sources["w"]], MergeSpec("cat", (1.0, 1.0)))
    assert out.modules[ModuleKey(0, "q_proj")].rank == 8 and out.modules[ModuleKey(0, "k_proj")].rank == 4


def test_seed_is_deterministic_and_leaves_global_rng(sources):
    spec = MergeSpec("dare_ties", (0.5, 0.5), density=0.5, seed=42)
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    x = merge([sources["x"], sources["z"]], spec)
    y = merge([sources["x"], sources["z"]], spec)
    assert torch.rand(1) == before  # a seeded merge does not touch the global generator
    for k in x.modules:
        assert torch.equal(x.modules[k].a, y.modules[k].a) and torch.equal(x.modules[k].b, y.modules[k].b)


def test_unseeded_follows_global_rng_like_peft(peft_model, sources):
    torch.manual_seed(77)
    ours = merge([sources["x"], sources["z"]], MergeSpec("dare_linear", (0.5, 0.8), density=0.5))
    theirs = _peft_merge(peft_model, ["x", "z"], [0.5, 0.8], seed=77, combination_type="dare_linear", density=0.5)
    for key, delta in theirs.items():
        torch.testing.assert_close(ours.modules[key].delta_weight(), delta, atol=ATOL, rtol=RTOL)


def test_peft_saved_folders(peft_model, sources, tmp_path):
    """LoraWeights.load reads PEFT folders (non-default adapters land in a subfolder named after them),
    and a merged adapter saved by PEFT loads to the same deltas as ours."""
    peft_model.save_pretrained(str(tmp_path), selected_adapters=["y", "w"])
    for n in ("y", "w"):
        loaded = LoraWeights.load(tmp_path / n, n)
        assert set(loaded.modules) == set(sources[n].modules)
        for k, m in loaded.modules.items():
            assert m.scale == pytest.approx(sources[n].modules[k].scale)
            torch.testing.assert_close(m.delta_weight(), sources[n].modules[k].delta_weight())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.add_weighted_adapter(["y", "w"], [0.4, 1.1], "saved_cat", combination_type="cat")
    try:
        peft_model.save_pretrained(str(tmp_path), selected_adapters=["saved_cat"])
    finally:
        peft_model.delete_adapter("saved_cat")
    loaded = LoraWeights.load(tmp_path / "saved_cat", "saved_cat")
    ours = merge([LoraWeights.load(tmp_path / "y", "y"), LoraWeights.load(tmp_path / "w", "w")],
                 MergeSpec("cat", (0.4, 1.1)))
    assert set(loaded.modules) == set(ours.modules)
    for k, m in loaded.modules.items():
        assert m.scale == 1.0 and m.rank == 12  # PEFT: r = lora_alpha = sum of ranks, zero-padded
        torch.testing.assert_close(ours.modules[k].delta_weight(), m.delta_weight(), atol=ATOL, rtol=RTOL)


def test_default_name_is_cache_key(sources):
    spec = MergeSpec("linear", (1.0, 1.0))
    out = merge([sources["x"], sources["z"]], spec)
    assert out.name == "merged-" + spec.cache_key(["x", "z"])[:16]
    assert merge([sources["x"], sources["z"]], spec, name="x").name == "x"


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

BAD_SPECS = [
    ({"strategy": "average", "weights": (1.0,)}, "unknown merge strategy"),
    ({"strategy": "linear", "weights": ()}, "at least one"),
    ({"strategy": "linear", "weights": 1.0}, "list of numbers"),
    ({"strategy": "linear", "weights": (1.0, float("nan"))}, "finite"),
    ({"strategy": "linear", "weights": (True,)}, "finite number"),
    ({"strategy": "ties", "weights": (1.0, 1.0)}, "needs a density"),
    ({"strategy": "ties", "weights": (1.0, 1.0), "density": 0.0}, "(0, 1]"),
    ({"strategy": "dare_linear", "weights": (1.0, 1.0), "density": 1.5}, "(0, 1]"),
    ({"strategy": "dare_ties", "weights": (1.0, 1.0), "density": -0.1}, "(0, 1]"),
    ({"strategy": "linear", "weights": (1.0, 1.0), "density": 0.5}, "takes no density"),
    ({"strategy": "ties", "weights": (1.0,), "density": 0.5, "majority_sign_method": "mean"}, "majority_sign"),
    ({"strategy": "dare_linear", "weights": (1.0,), "density": 0.5, "majority_sign_method": "frequency"},
     "takes no majority_sign_method"),
    ({"strategy": "svd", "weights": (1.0,), "svd_rank": 0}, "svd_rank"),
    ({"strategy": "svd", "weights": (1.0,), "svd_rank": 2.0}, "svd_rank"),
    ({"strategy": "cat", "weights": (1.0,), "svd_rank": 4}, "takes no svd_rank"),
    ({"strategy": "svd", "weights": (1.0,), "svd_clamp": 1.5}, "svd_clamp"),
    ({"strategy": "linear", "weights": (1.0,), "svd_clamp": 0.9}, "takes no svd_clamp"),
    ({"strategy": "dare_linear", "weights": (1.0,), "density": 0.5, "seed": -1}, "seed"),
    ({"strategy": "dare_linear", "weights": (1.0,), "density": 0.5, "seed": "1"}, "seed"),
]


@pytest.mark.parametrize("kwargs,message", BAD_SPECS, ids=[m for _, m in BAD_SPECS])
def test_spec_validation(kwargs, message):
    with pytest.raises(InvalidMergeError) as exc:
        MergeSpec(**kwargs)
    assert message in str(exc.value) and "\n" not in str(exc.value)
    assert isinstance(exc.value, InvalidAdapterError) and isinstance(exc.value, ValueError)


def test_spec_normalises_weights():
    spec = MergeSpec("linear", [1, 0.5])
    assert spec.weights == (1.0, 0.5) and isinstance(spec.weights, tuple)
    hash(spec)


def test_merge_validation(sources):
    a, b, c = sources["x"], sources["y"], sources["z"]
    cases = [
        (lambda: merge([], MergeSpec("linear", (1.0,))), "at least one adapter"),
        (lambda: merge([a, c], MergeSpec("linear", (1.0,))), "1 weights for 2 adapters"),
        (lambda: merge([a, b], MergeSpec("linear", (1.0, 1.0))), "one rank"),
        (lambda: merge([a, b], MergeSpec("dare_ties", (1.0, 1.0), density=0.5)), "one rank"),
    ]
    wrong = LoraWeights("wrong", {ModuleKey(0, "q_proj"): LoraModule(torch.zeros(4, 32), torch.zeros(64, 4), 1.0)})
    cases.append((lambda: merge([a, wrong], MergeSpec("cat", (1.0, 1.0))), "disagree on the shape of layers.0.q_proj"))
    for call, message in cases:
        with pytest.raises(InvalidMergeError) as exc:
            call()
        assert message in str(exc.value), str(exc.value)


def test_registry_lists_peft_strategies():
    assert {"linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
            "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"} == set(STRATEGIES)


# ---------------------------------------------------------------------------------------------
# cache_key
# ---------------------------------------------------------------------------------------------

def test_cache_key():
    base = dict(strategy="dare_ties", weights=(0.5, 0.5), density=0.5, seed=1)
    names = ["x@1", "y@2"]
    key = MergeSpec(**base).cache_key(names)
    assert len(key) == 64 and key == MergeSpec(**base).cache_key(list(names))
    assert key == MergeSpec(**{**base, "weights": [0.5, 0.5]}).cache_key(tuple(names))
    variants = [
        MergeSpec(**base).cache_key(["y@2", "x@1"]),
        MergeSpec(**base).cache_key(["x@1", "y@3"]),
        MergeSpec(**base).cache_key(["x@1"]),
        MergeSpec(**{**base, "weights": (0.5, 0.5000001)}).cache_key(names),
        MergeSpec(**{**base, "density": 0.6}).cache_key(names),
        MergeSpec(**{**base, "seed": 2}).cache_key(names),
        MergeSpec(**{**base, "seed": None}).cache_key(names),
        MergeSpec(**{**base, "majority_sign_method": "frequency"}).cache_key(names),
        MergeSpec(**{**base, "strategy": "dare_linear"}).cache_key(names),
        MergeSpec(**{**base, "strategy": "dare_ties_svd"}).cache_key(names),
        MergeSpec(**{**base, "strategy": "dare_ties_svd", "svd_rank": 8}).cache_key(names),
        MergeSpec(**{**base, "strategy": "dare_ties_svd", "svd_clamp": 0.99}).cache_key(names),
    ]
    assert len({key, *variants}) == len(variants) + 1
    # a seed changes nothing for a strategy that draws no random numbers
    assert MergeSpec("cat", (1.0, 2.0), seed=1).cache_key(names) == MergeSpec("cat", (1.0, 2.0)).cache_key(names)


@pytest.mark.parametrize("weight", [1e30, -11.0, float("nan")])
def test_merge_weights_are_bounded(weight):
    from loraplex.server.lora.merge import InvalidMergeError, MergeSpec

    with pytest.raises(InvalidMergeError, match="weight"):
        MergeSpec("linear", (1.0, weight))
