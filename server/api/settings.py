"""Server settings: flags, else ``LORAPLEX_*`` environment variables, else defaults (the edge:
nothing below this reads the environment)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    engine: Literal["native", "vllm"] = "native"  # native: loraplex's engine; vllm: vLLM's AsyncLLM (extra `vllm`)
    model: str = "smollm2-135m-instruct"
    quantize: Literal["nf4", "int8", "none"] | None = None  # None: the engine's default (native nf4, vllm none)
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    device: Literal["cpu", "cuda"] = "cpu"
    registry: str | None = None  # default: LORAPLEX_HOME/registry (see adapters.config)
    api_keys_file: Path | None = None
    api_key: str | None = None  # one key with every scope and adapter
    max_loras: int = Field(default=8, ge=1)
    max_lora_rank: int = Field(default=64, ge=1)
    max_cpu_loras: int = Field(default=32, ge=1)
    max_running: int = Field(default=32, ge=1)
    max_model_len: int = Field(default=2048, ge=16)
    max_batched_tokens: int = Field(default=1024, ge=16)
    prefill_chunk: int = Field(default=256, ge=16)
    load_share: float = Field(default=0.15, ge=0, lt=1)  # share of step time yielded to adapter loads
    max_queue: int = Field(default=256, ge=1)
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    max_tokens: int = Field(default=2048, ge=1)
    request_timeout: float = Field(default=600.0, gt=0)
    registry_ttl: float = Field(default=5.0, ge=0)  # seconds a resolved alias/latest/route is reused
    # vLLM engine only (passed through to vLLM):
    tensor_parallel_size: int = Field(default=1, ge=1)
    pipeline_parallel_size: int = Field(default=1, ge=1)
    kv_cache_gib: float | None = Field(default=None, gt=0)  # KV cache size; None: 4 on CPU, vLLM's default on GPUs

    @property
    def quantization(self) -> str:
        """``quantize``, or the engine's default when unset."""
        if self.quantize is not None:
            return self.quantize
        return "nf4" if self.engine == "native" else "none"
