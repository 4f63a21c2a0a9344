"""A tiny Llama and PEFT adapters with different ranks and module sets, built in-process."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=256, tie_word_embeddings=False)

# name -> LoraConfig kwargs: different ranks, module sets and scalings.
ADAPTERS = {
    "qv4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "mlp16rs": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["o_proj", "gate_proj", "up_proj", "down_proj"]),
}


def tiny_llama(seed: int = 0, dims: dict | None = None) -> LlamaForCausalLM:
    """The tiny Llama; ``dims`` overrides some of ``TINY`` (e.g. the heads, for vLLM)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **(dims or {})})).eval()
    return model


def exact_nf4(model: torch.nn.Module) -> torch.nn.Module:
    """A bitsandbytes NF4 model on the path training runs: each forward dequantizes the NF4 values and multiplies
    in the compute dtype. On CPUs with AVX512-BF16, in eval mode under no_grad, bitsandbytes otherwise repacks each
    weight for its inference kernel, which rounds to bfloat16 (~4e-3 of a row's scale, measured on AMD Zen 4): not
    the values a QLoRA adapter was trained against (the trainer switches it off too, trainer/recipe.py)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def make_peft_adapters(folder: Path, seed: int = 1, specs: dict = ADAPTERS, dims: dict | None = None) -> dict[str, Path]:
    """Save each adapter as its own PEFT folder (random, non-zero B); returns name -> folder."""
    out = {}
    for i, (name, kw) in enumerate(specs.items()):
        base = tiny_llama(dims=dims)
        torch.manual_seed(seed + i)
        peft_model = get_peft_model(base, LoraConfig(**kw, lora_dropout=0.0))
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn_like(p) * 0.1)
        peft_model.save_pretrained(folder / name)
        out[name] = folder / name
    return out


def peft_reference(folders: dict[str, Path]) -> PeftModel:
    """The tiny base with every adapter loaded into one PeftModel."""
    names = list(folders)
    model = PeftModel.from_pretrained(tiny_llama(), str(folders[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(folders[n]), adapter_name=n)
    return model.eval()


def make_engine(folders: dict[str, Path], **kw):
    """The native engine on the tiny Llama, loading ``folders``' adapters by name; ``kw`` overrides its config."""
    from loraplex.server.engine.engine import Engine, EngineConfig
    from loraplex.server.lora.weights import LoraWeights

    model = tiny_llama()
    cfg = EngineConfig(**{"max_loras": 4, "max_lora_rank": 16, "max_running": 8, "max_model_len": 128, **kw})
    return Engine(model, model.config, engine_config=cfg, loader=lambda name: LoraWeights.load(folders[name], name))
