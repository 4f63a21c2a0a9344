"""Putting the server together: settings -> base model, engine, registry, keys, metrics -> app -> uvicorn."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from adapters import AdapterCache, AdapterRegistry
from adapters.config import load_settings
from adapters.routes import RouteStore

from .api.app import Limits, create_app
from .api.auth import KeyStore
from .api.metrics import Metrics
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


def build_server(settings: ServerSettings) -> Server:
    from .engine.engine import EngineConfig
    from .engine.process import EngineLaunch, EngineProcess
    from .model.loader import ModelSpec

    reg_settings = load_settings(registry=settings.registry)
    registry = AdapterRegistry(reg_settings.registry, cache=AdapterCache(reg_settings.cache))
    keys = KeyStore.load(settings.api_keys_file, settings.api_key)
    spec = ModelSpec(model=settings.model, quantize=settings.quantize, dtype=settings.dtype, device=settings.device)
    cfg = EngineConfig(max_loras=settings.max_loras, max_lora_rank=settings.max_lora_rank,
                       max_cpu_loras=settings.max_cpu_loras, max_running=settings.max_running,
                       max_model_len=settings.max_model_len, max_batched_tokens=settings.max_batched_tokens,
                       prefill_chunk=settings.prefill_chunk)
    backend = EngineProcess(EngineLaunch(spec, cfg, reg_settings.registry, str(reg_settings.cache)))
    info = backend.info["base_info"]
    resolver = Resolver(registry, info.id, info, RouteStore(registry), ttl=settings.registry_ttl)
    limits = Limits(max_body_bytes=settings.max_body_bytes, max_tokens=settings.max_tokens,
                    max_queue=settings.max_queue, request_timeout=settings.request_timeout)
    app = create_app(backend, resolver, keys=keys, metrics=Metrics(), limits=limits)
    log.info("loraplex: base %s (%s, %s, %.0f MB resident) loaded in %.1f s in the engine process; registry %s; %s",
             info.id, settings.quantize, settings.device, backend.info["resident_bytes"] / 1e6,
             backend.info["load_seconds"], registry.uri, keys.describe())
    return Server(settings, app, backend)
