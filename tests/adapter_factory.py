"""Build small PEFT LoRA adapter folders in-process, for tests and benchmarks (numpy, no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

# A tiny Llama-style base: the shapes adapters must fit.
TINY_BASE_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
    "_name_or_path": "tiny-llama",
}
ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def module_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def lora_tensors(cfg: dict, r: int, modules=ALL_MODULES, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = module_shapes(cfg)
    out = {}
    for layer in range(cfg["num_hidden_layers"]):
        for mod in modules:
            in_f, out_f = shapes[mod]
            part = "self_attn" if mod in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{mod}"
            out[f"{key}.lora_A.weight"] = (rng.standard_normal((r, in_f)) * 0.02).astype(dtype)
            out[f"{key}.lora_B.weight"] = (rng.standard_normal((out_f, r)) * 0.02).astype(dtype)
    return out


def adapter_config(r: int, modules=ALL_MODULES, base: str = "tiny-llama", **extra) -> dict:
    return {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(modules),
            "base_model_name_or_path": base, "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM",
            "use_rslora": False, **extra}


def write_adapter(folder: Path, cfg: dict = TINY_BASE_CONFIG, r: int = 4, modules=ALL_MODULES, seed: int = 0,
                  base: str | None = None, tensors: dict | None = None, config: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    conf = config if config is not None else adapter_config(r, modules, base or cfg.get("_name_or_path", "tiny-llama"))
    (folder / "adapter_config.json").write_text(json.dumps(conf))
    save_file(tensors if tensors is not None else lora_tensors(cfg, r, modules, seed), str(folder / "adapter_model.safetensors"))
    return folder


def write_base_config(folder: Path, cfg: dict = TINY_BASE_CONFIG) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder
