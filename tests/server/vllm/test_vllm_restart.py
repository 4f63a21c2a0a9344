"""kill -9 of vLLM's engine core under load, on a live server with ``--engine vllm`` (CPU, bounded in time).

The contract of the native engine (``tests/server/api/test_chaos.py``): every client gets a complete answer or a
clean error (an OpenAI error envelope, or the stream's error event), none hangs; ``/ready`` answers 503 until the
new engine is up, then the server serves again (adapters and mixtures included), the pin is applied again,
``/metrics`` counts the restart, and the dead engine's processes are gone.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
from chaos_load import MSG, kill_under_load, wait_ready
from engine_fixtures import ADAPTERS, make_peft_adapters
from server_fixtures import VLLM_HEADS, LiveServer, free_port, save_tiny_base, vllm_settings

from loraplex.adapters import AdapterCache, AdapterRegistry
from loraplex.server.api.settings import ServerSettings

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow
DIMS = {**VLLM_HEADS, "max_position_embeddings": 2048}  # streams long enough to be cut by the kill


def descendants(pid: int) -> dict[int, str]:
    """Live (not zombie) descendants of ``pid`` from /proc: pid -> short name (vLLM titles its processes
    ``VLLM::EngineCore``, ``VLLM::Worker``)."""
    table = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
        table[int(d.name)] = (int(ppid), stat[stat.index("(") + 1:stat.rindex(")")], state)
    out, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, name, state) in table.items():
            if ppid == parent and state != "Z":
                out[child] = name
                todo.append(child)
    return out


def vllm_procs() -> dict[int, str]:
    return {p: n for p, n in descendants(os.getpid()).items() if n.startswith("VLLM::")}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-restart")
    base = save_tiny_base(root / "tiny-base", DIMS)
    folders = make_peft_adapters(root / "peft", specs={"qv4": ADAPTERS["qv4"], "all8": ADAPTERS["all8"]},
                                 dims=DIMS)
    reg = AdapterRegistry((root / "registry").as_uri(), cache=AdapterCache(root / "cache"))
    reg.push(folders["qv4"], "helper", base_model=str(base))
    reg.push(folders["all8"], "other", base_model=str(base))
    before = set(vllm_procs())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPLEX_HOME", str(root / "home"))
        s = LiveServer(ServerSettings(model=str(base), quantize="none", dtype="float32", port=free_port(),
                                      registry=(root / "registry").as_uri(), max_lora_rank=16, max_model_len=2048,
                                      registry_ttl=0.0, **vllm_settings("vllm")))
        s.procs = {p: n for p, n in vllm_procs().items() if p not in before}  # this server's vLLM processes
        yield s
        s.stop()


def test_kill_9_of_the_vllm_engine_core_mid_stream(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert httpx.post(server.url + "/v1/adapters/helper@1/pin", timeout=30).json()["pinned"] is True
    cores = [p for p, n in server.procs.items() if n.startswith("VLLM::EngineCor")]
    assert len(cores) == 1, server.procs
    kill_under_load(server.url, lambda: os.kill(cores[0], signal.SIGKILL))
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny-base", "prompt": "w1", "max_tokens": 2},
                   timeout=10)
    if r.status_code != 200 or httpx.get(server.url + "/ready", timeout=5).status_code != 200:  # not back yet
        assert r.status_code == 503 and "retry-after" in r.headers, (r.status_code, r.text)  # at once, not queued

    wait_ready(server.url, 240)
    listed = {a["id"]: a for a in httpx.get(server.url + "/v1/adapters", timeout=10).json()["data"]}
    assert listed.get("helper@1", {}).get("pinned") is True, listed  # pinned again in the new engine
    r = client.chat.completions.create(model="helper", messages=MSG, max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    r = client.chat.completions.create(model="tiny-base", messages=MSG, max_tokens=4, temperature=0,
                                       extra_body={"adapters": [{"name": "helper@1", "weight": 0.5},
                                                                {"name": "other@1", "weight": 0.5}]})
    assert r.usage.completion_tokens == 4
    metrics = httpx.get(server.url + "/metrics", timeout=5).text
    assert "loraplex_engine_restarts_total 1.0" in metrics
    assert server.backend.stats()["restarts"] == 1

    gone = time.monotonic() + 30  # the dead engine's processes (its worker too) exit; a new engine core serves
    while set(server.procs) & set(vllm_procs()):
        assert time.monotonic() < gone, f"processes of the dead engine left: {server.procs} vs {vllm_procs()}"
        time.sleep(0.2)
    assert any(n.startswith("VLLM::EngineCor") for n in vllm_procs().values())
