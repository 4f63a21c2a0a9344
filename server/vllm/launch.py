"""What the vLLM engine is started with: loraplex's settings mapped onto vLLM's ``AsyncEngineArgs``.

Mapped: ``max_loras`` (adapters in one batch), ``max_cpu_loras`` (vLLM's host-side adapter cache; vLLM
wants it >= max_loras), ``max_lora_rank`` (rounded up to a rank vLLM accepts; loraplex still refuses
adapters above the configured value), ``max_running`` -> ``max_num_seqs``, ``max_batched_tokens`` ->
``max_num_batched_tokens``, ``max_model_len``, ``dtype``, tensor and pipeline parallel sizes, and the KV
cache size. Not mapped: ``prefill_chunk`` (vLLM chunks prefills within ``max_num_batched_tokens`` itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraplex.adapters.errors import ConfigError

# vllm.config.lora.MaxLoRARanks in vLLM 0.32: the ranks its LoRA kernels are built for.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_GIB = 1 << 30
_CPU_KV_GIB = 4.0


def vllm_rank(max_lora_rank: int) -> int:
    """The smallest rank vLLM accepts that holds ``max_lora_rank``."""
    for r in VLLM_RANKS:
        if r >= max_lora_rank:
            return r
    raise ConfigError(f"max_lora_rank {max_lora_rank} is above the largest rank vLLM serves ({VLLM_RANKS[-1]})")


@dataclass(frozen=True, slots=True)
class VllmLaunch:
    """Everything the vLLM engine needs to start (plain values)."""

    model: Path  # an HF folder: config.json, safetensors, tokenizer
    dtype: str = "bfloat16"
    quantize: str = "none"  # nf4 maps to vLLM's in-flight bitsandbytes quantization (CUDA builds only)
    device: str = "cpu"  # which vLLM build is installed decides where it runs; this only picks eager mode
    max_loras: int = 8
    max_cpu_loras: int = 32
    max_lora_rank: int = 64
    max_running: int = 32
    max_model_len: int | None = None  # None: the model's context length (vLLM reads it)
    max_batched_tokens: int = 1024
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    kv_cache_gib: float | None = None  # None: 4 GiB on CPU, vLLM's default (a share of free memory) on GPUs
    prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.quantize not in ("none", "nf4"):
            raise ConfigError(f"the vLLM engine cannot serve quantize={self.quantize!r}: use none (or nf4 on CUDA)")
        if self.quantize == "nf4" and self.device != "cuda":
            raise ConfigError("the vLLM engine on CPU serves unquantized weights: use --quantize none "
                              "(nf4 maps to vLLM's bitsandbytes quantization, which needs CUDA)")
        vllm_rank(self.max_lora_rank)

    def engine_args(self):
        """vLLM's ``AsyncEngineArgs`` for this launch."""
        from vllm.engine.arg_utils import AsyncEngineArgs

        extra = {}
        # On CPU vLLM would otherwise reserve 90% of the machine's memory, and refuse to start when less is
        # free. (VLLM_CPU_KVCACHE_SPACE, vLLM's own variable, still wins when set.)
        kv_gib = self.kv_cache_gib if self.kv_cache_gib is not None else (_CPU_KV_GIB if self.device == "cpu" else None)
        if kv_gib is not None:
            extra["kv_cache_memory_bytes"] = int(kv_gib * _GIB)
        if self.quantize == "nf4":
            extra["quantization"] = "bitsandbytes"
        return AsyncEngineArgs(
            model=str(self.model),
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_running,
            max_num_batched_tokens=self.max_batched_tokens,
            enable_lora=True,
            max_loras=self.max_loras,
            max_cpu_loras=max(self.max_cpu_loras, self.max_loras),
            max_lora_rank=vllm_rank(self.max_lora_rank),
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
            # On CPU, torch.compile costs minutes at start for little gain on small models; CUDA keeps
            # vLLM's compiled graphs.
            enforce_eager=self.device == "cpu",
            enable_prefix_caching=self.prefix_caching,  # keyed per adapter by its LoRA name and path (see catalog.lora_key)
            disable_log_stats=True,  # loraplex's own stat logger is passed instead (see stats.py)
            **extra,
        )
