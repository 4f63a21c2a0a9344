"""The fast API tests' world: a folder registry of tiny adapters (numpy, no torch), apps over a
``ScriptedBackend``, in-process clients (httpx's ASGI transport) and a uvicorn server in a thread."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from adapter_factory import write_adapter, write_base_config
from ports import free_port

from loraplex.adapters import AdapterCache, AdapterRegistry
from loraplex.adapters.basemodel import resolve_base_model
from loraplex.server.api.app import RequestLimits, create_app
from loraplex.server.api.auth import KeyStore, hash_key
from loraplex.server.api.metrics import Metrics
from loraplex.server.api.resolver import Resolver
from loraplex.server.api.scripted import ScriptedBackend

ADMIN_KEY = "ops-admin-key-000000001"  # inference + admin, every adapter
ACME_KEY = "acme-inference-key-0001"  # inference, acme-* only
ACME_ADMIN_KEY = "acme-admin-key-0000001"  # inference + admin, acme-* only (a tenant's admin)
METRICS_KEY = "scraper-metrics-key-001"  # metrics only
LIMITED_KEY = "acme-limited-key-000001"  # inference, acme-* only, at most 2 generations in flight
MSG = [{"role": "user", "content": "say something"}]


@dataclass
class World:
    root: Path  # the module's temporary folder
    base: Path  # the tiny base's config folder
    registry: AdapterRegistry  # helper@1 (alias prod), helper@2, acme-bot@1
    folders: dict[str, Path]  # adapter folders by name (also for the admin load)
    keyfile: Path  # ADMIN_KEY, ACME_KEY, ACME_ADMIN_KEY, METRICS_KEY, LIMITED_KEY


@dataclass
class Api:
    app: object  # the FastAPI app
    backend: ScriptedBackend
    resolver: Resolver
    metrics: Metrics

    def client(self, key: str | None = None) -> httpx.AsyncClient:
        """An in-process client (no sockets); requests with ``key`` as a bearer token."""
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://api", headers=headers)

    def openai(self, key: str = "unused") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url="http://api/v1", api_key=key, max_retries=0,
                                  http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app)))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("scripted")
    base = write_base_config(root / "tiny-base")
    registry = AdapterRegistry((root / "registry").as_uri(), cache=AdapterCache(root / "cache"))
    folders = {"h1": write_adapter(root / "h1", seed=1), "h2": write_adapter(root / "h2", r=2, seed=2),
               "acme": write_adapter(root / "acme", seed=3), "local": write_adapter(root / "local", seed=4)}
    registry.push(folders["h1"], "helper", base_model=str(base))
    registry.push(folders["h2"], "helper", base_model=str(base))
    registry.tag("helper@1", "prod")
    registry.push(folders["acme"], "acme-bot", base_model=str(base))
    keyfile = root / "keys.yaml"
    keyfile.write_text(yaml.safe_dump({"keys": [
        {"name": "acme", "key_sha256": hash_key(ACME_KEY), "scopes": ["inference"], "adapters": ["acme-*"]},
        {"name": "ops", "key": ADMIN_KEY, "scopes": ["inference", "admin"]},
        {"name": "acme-ops", "key": ACME_ADMIN_KEY, "scopes": ["inference", "admin"], "adapters": ["acme-*"]},
        {"name": "scraper", "key": METRICS_KEY, "scopes": ["metrics"]},
        {"name": "acme-limited", "key": LIMITED_KEY, "adapters": ["acme-*"], "max_concurrent": 2},
    ]}))
    return World(root, base, registry, folders, keyfile)


def make_api(world: World, *, keyed: bool = False, limits: RequestLimits = RequestLimits(), metrics_open: bool = False,
             **backend_kw) -> Api:
    """An app over a fresh ScriptedBackend; ``keyed``: guarded by the world's key file, else open."""
    info = resolve_base_model(str(world.base))
    backend = ScriptedBackend(info.id, **backend_kw)
    resolver = Resolver(world.registry, info.id, info, ttl=0.0)
    keys = KeyStore.from_file(world.keyfile) if keyed else KeyStore.open()
    metrics = Metrics()
    app = create_app(backend, resolver, keys=keys, metrics=metrics, limits=limits, metrics_open=metrics_open)
    return Api(app, backend, resolver, metrics)


def run(coro):
    return asyncio.run(coro)


class LiveApi:
    """An app served by uvicorn on a free loopback port, in a daemon thread."""

    def __init__(self, api: Api) -> None:
        import uvicorn

        self.api = api
        port = free_port()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        self.url = f"http://127.0.0.1:{port}"
        self._uv = uvicorn.Server(uvicorn.Config(api.app, host="127.0.0.1", port=port, log_level="warning",
                                                 lifespan="off"))
        self._thread = threading.Thread(target=self._uv.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.02)
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        self._uv.should_exit = True
        self._thread.join(10)


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
