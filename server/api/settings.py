"""Server settings: flags, else ``LORAPLEX_*`` environment variables, else defaults (the edge:
nothing below this reads the environment).

This class is the one list of them: ``loraplex serve`` builds a flag from each field (``--max-loras`` from
``max_loras``, its help from the field's description, its type and choices from the annotation), so a new
setting gets its flag, its ``LORAPLEX_*`` variable and its help line by being added here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..hardware import BaseFormat, choose

# Settings without a ``serve`` flag of their own: the registry comes from the ``--registry`` flag every
# loraplex command takes, and a key given on the command line would show in ``ps`` and the shell's history.
NOT_FLAGS = frozenset({"registry", "api_key", "metrics_key"})


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="ignore")

    host: str = Field(default="127.0.0.1", description="address to bind")
    port: int = Field(default=8000, ge=0, le=65535, description="port to listen on")
    engine: Literal["native", "vllm"] = Field(
        default="native", description="native: loraplex's engine; vllm: vLLM's async engine (pip install "
                                      "'loraplex[vllm]')")
    model: str = Field(default="smollm2-135m-instruct",
                       description="base model: the embedded smollm2-135m-instruct or a local Hugging Face folder")
    quantize: Literal["nf4", "int8", "none"] | None = Field(
        default=None, description="the base's values (unset: nf4 on the native engine, none on vllm)")
    weights: Literal["packed", "dense"] | None = Field(
        default=None, description="native engine, a quantized base: packed (bitsandbytes' kernels) or dense (its "
                                  "values dequantized once; plain matmuls) (unset: dense on CPUs without AVX-512)")
    dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        default=None, description="dense weights, activations and KV cache (unset: float32 on CPUs without "
                                  "AVX-512, else bfloat16)")
    device: Literal["cpu", "cuda"] = Field(default="cpu", description="where the model runs")
    registry: str | None = Field(default=None, description="registry URI, file:///path or s3://bucket/prefix (unset: "
                                                           "the config file's, else LORAPLEX_HOME/registry)")
    api_keys_file: Path | None = Field(default=None, description="YAML file of API keys, scopes and adapter patterns "
                                                                 "(none, and no api_key: an open server)")
    api_key: str | None = Field(default=None, description="one key with every scope and adapter")
    metrics_key: str | None = Field(default=None, description="one key that may only read GET /metrics "
                                                              "(for a Prometheus scrape)")
    allow_open: bool = Field(default=False, description="serve without API keys on an address other than loopback "
                                                        "(anyone who reaches it may use and administer every adapter)")
    metrics_open: bool = Field(default=False, description="serve GET /metrics without a key (it names every "
                                                          "tenant's adapters; else a key with the metrics scope)")
    max_loras: int = Field(default=8, ge=1, description="adapters resident in device slots at once")
    max_lora_rank: int = Field(default=64, ge=1, description="the largest adapter rank served")
    max_cpu_loras: int = Field(default=32, ge=1, description="adapters kept in host memory")
    max_running: int = Field(default=32, ge=1, description="sequences generated at once")
    max_model_len: int | None = Field(default=None, ge=16, description="prompt and output tokens per sequence "
                                                                       "(unset: the model's context length)")
    max_batched_tokens: int = Field(default=1024, ge=16, description="tokens in one engine step")
    prefill_chunk: int = Field(default=256, ge=16,
                               description="native engine: the most prompt tokens of one sequence in a step")
    prefix_caching: bool = Field(default=True, description="reuse the KV blocks of prompt prefixes computed before "
                                                           "(per adapter content and per API key)")
    load_share: float = Field(default=0.15, ge=0, lt=1, description="native engine: share of each step's time "
                                                                     "given to adapter loads while one runs")
    max_queue: int = Field(default=256, ge=1, description="requests that may wait beyond those running")
    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="largest request body accepted")
    max_tokens: int = Field(default=2048, ge=1, description="the most tokens one request may generate")
    request_timeout: float = Field(default=600.0, gt=0, description="seconds a request may take")
    registry_ttl: float = Field(default=5.0, ge=0,
                                description="seconds a resolved alias, latest version or route is reused")
    # vLLM engine only (passed through to vLLM):
    tensor_parallel_size: int = Field(default=1, ge=1, description="vllm engine: GPUs to shard each layer over")
    pipeline_parallel_size: int = Field(default=1, ge=1, description="vllm engine: GPUs to split the layers over")
    kv_cache_gib: float | None = Field(
        default=None, gt=0, description="KV cache size in GiB (unset: native engine, at most 2 and no more than "
                                        "max_running full-length sequences need; vllm engine, 4 on CPU and vLLM's "
                                        "own share on GPUs)")

    def base_format(self, dense_bytes: int | None = None) -> BaseFormat:
        """The base's values, weight layout and dtype: as set, the rest chosen for this machine (see hardware.py)."""
        return choose(self.engine, self.device, self.quantize, self.weights, self.dtype, dense_bytes)
