"""Faults under load, on a live server with the native engine (CPU, bounded in time).

kill -9 of the engine child while requests stream: every client gets a complete answer or a clean error (an
OpenAI error envelope, or the stream's error event), none hangs; ``/ready`` answers 503 until the new child is up,
then the server serves again (pins kept) and ``/metrics`` counts the restart.
"""

from __future__ import annotations

import os
import signal

import httpx
import openai
import pytest
from chaos_load import MSG, kill_under_load, wait_ready
from engine_fixtures import ADAPTERS, make_peft_adapters
from server_fixtures import LiveServer, free_port, save_tiny_base

from loraplex.adapters import AdapterCache, AdapterRegistry
from loraplex.server.api.settings import ServerSettings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("chaos")
    base = save_tiny_base(root / "tiny-base")
    folders = make_peft_adapters(root / "peft", specs={"qv4": ADAPTERS["qv4"]})
    reg = AdapterRegistry((root / "registry").as_uri(), cache=AdapterCache(root / "cache"))
    reg.push(folders["qv4"], "helper", base_model=str(base))
    old = os.environ.get("LORAPLEX_HOME")
    os.environ["LORAPLEX_HOME"] = str(root / "home")
    s = LiveServer(ServerSettings(model=str(base), quantize="none", dtype="float32", registry=(root / "registry").as_uri(),
                                  port=free_port(), max_lora_rank=16, max_model_len=2048, registry_ttl=0.0))
    yield s
    s.stop()
    if old is None:
        os.environ.pop("LORAPLEX_HOME", None)
    else:
        os.environ["LORAPLEX_HOME"] = old


def test_kill_9_of_the_engine_mid_stream(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert httpx.post(server.url + "/v1/adapters/helper@1/pin", timeout=30).json()["pinned"] is True
    pid = server.backend._proc.pid
    kill_under_load(server.url, lambda: os.kill(pid, signal.SIGKILL))
    wait_ready(server.url, 180)
    assert server.backend._proc.pid != pid
    r = client.chat.completions.create(model="helper", messages=MSG, max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    listed = httpx.get(server.url + "/v1/adapters", timeout=5).json()
    assert {a["id"]: a["pinned"] for a in listed["data"]}.get("helper@1") is True, listed  # the pin survived
    metrics = httpx.get(server.url + "/metrics", timeout=5).text
    assert "loraplex_engine_restarts_total 1.0" in metrics
    loads = [float(x.split()[-1]) for x in metrics.splitlines() if x.startswith("loraplex_adapter_load_seconds_count")]
    assert loads and loads[0] >= 2  # helper loaded by the first engine and again by its successor: both counted
