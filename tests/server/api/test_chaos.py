"""Faults under load, on a live server with the native engine (CPU, bounded in time).

kill -9 of the engine child while requests stream: every client gets a complete answer or a clean error (an
OpenAI error envelope, or the stream's error event), none hangs; ``/ready`` answers 503 until the new child is up,
then the server serves again (pins kept) and ``/metrics`` counts the restart.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import openai
import pytest
from engine_fixtures import ADAPTERS, make_peft_adapters
from server_fixtures import LiveServer, free_port, save_tiny_base

from loraplex.adapters import AdapterCache, AdapterRegistry
from loraplex.server.api.settings import ServerSettings

pytestmark = pytest.mark.slow
MSG = [{"role": "user", "content": "w10 w11 w12"}]


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
    results: dict[str, str] = {}
    started = threading.Barrier(6)  # 4 streams, the plain request, this thread

    def stream(i: int) -> None:
        model = "helper" if i % 2 else "tiny-base"
        try:
            pieces = []
            first = True
            for chunk in client.chat.completions.create(model=model, messages=MSG, max_tokens=1500, temperature=0,
                                                        stream=True, extra_body={"ignore_eos": True}):
                if first:
                    first = False
                    started.wait(30)
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
            results[f"s{i}"] = "complete"
        except openai.APIError as exc:  # the stream's error event or an error status: a clean error
            results[f"s{i}"] = f"error: {exc.message[:80]}"
        except Exception as exc:  # noqa: BLE001  anything else is a failure of the contract
            results[f"s{i}"] = f"UNCLEAN {type(exc).__name__}: {exc}"

    def plain() -> None:
        started.wait(30)
        try:
            client.completions.create(model="tiny-base", prompt="w1 w2", max_tokens=1500, temperature=0,
                                      extra_body={"ignore_eos": True})
            results["plain"] = "complete"
        except openai.APIStatusError as exc:
            results["plain"] = f"error {exc.status_code}"
        except Exception as exc:  # noqa: BLE001
            results["plain"] = f"UNCLEAN {type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(4)]
    threads.append(threading.Thread(target=plain, daemon=True))
    for t in threads:
        t.start()
    started.wait(60)  # every stream has its first token, the plain request is sent
    time.sleep(0.2)
    pid = server.backend._proc.pid
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    saw_unready = False
    while time.monotonic() - killed_at < 5 and not saw_unready:
        saw_unready = httpx.get(server.url + "/ready", timeout=5).status_code == 503
        time.sleep(0.05)
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a client hangs"
    assert len(results) == 5 and not [r for r in results.values() if r.startswith("UNCLEAN")], results
    assert any(r.startswith("error") for r in results.values()), results  # the kill did cut requests short
    assert results["plain"] in ("complete", "error 503"), results
    assert saw_unready, "/ready never answered 503 while the engine was down"

    deadline = time.monotonic() + 180
    while httpx.get(server.url + "/ready", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "the engine did not come back"
        time.sleep(0.2)
    assert server.backend._proc.pid != pid
    r = client.chat.completions.create(model="helper", messages=MSG, max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    listed = httpx.get(server.url + "/v1/adapters", timeout=5).json()
    assert {a["id"]: a["pinned"] for a in listed["data"]}.get("helper@1") is True, listed  # the pin survived
    metrics = httpx.get(server.url + "/metrics", timeout=5).text
    assert "loraplex_engine_restarts_total 1.0" in metrics
    loads = [float(x.split()[-1]) for x in metrics.splitlines() if x.startswith("loraplex_adapter_load_seconds_count")]
    assert loads and loads[0] >= 2  # helper loaded by the first engine and again by its successor: both counted
