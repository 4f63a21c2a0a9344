"""Soak: 200 concurrent streaming clients for 60 s (LORAPLEX_SOAK_SECONDS) against a live server on the native
engine, over 6 adapters with 2 device slots (so adapters are loaded and evicted all the time), one client in ten
hanging up mid-stream. Every request ends in a complete answer or the client's own disconnect: zero errors.
The API process's and the engine process's RSS before and after are printed (and bounded loosely)."""

from __future__ import annotations

import asyncio
import os
import random
import time

import httpx
import openai
import pytest
from engine_fixtures import ADAPTERS, make_peft_adapters
from server_fixtures import LiveServer, free_port, save_tiny_base

from loraplex.adapters import AdapterCache, AdapterRegistry
from loraplex.server.api.settings import ServerSettings

pytestmark = pytest.mark.slow
SECONDS = float(os.environ.get("LORAPLEX_SOAK_SECONDS", "60"))
CLIENTS = 200
MSG = [{"role": "user", "content": "w10 w11 w12"}]


def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("soak")
    base = save_tiny_base(root / "tiny-base")
    folders = make_peft_adapters(root / "peft", specs={f"a{i}": ADAPTERS[k] for i, k in
                                                       enumerate(["qv4", "all8", "mlp16rs"] * 2)})
    reg = AdapterRegistry((root / "registry").as_uri(), cache=AdapterCache(root / "cache"))
    for name, folder in folders.items():
        reg.push(folder, f"soak-{name}", base_model=str(base))
    old = os.environ.get("LORAPLEX_HOME")
    os.environ["LORAPLEX_HOME"] = str(root / "home")
    s = LiveServer(ServerSettings(model=str(base), quantize="none", dtype="float32", registry=(root / "registry").as_uri(),
                                  port=free_port(), max_loras=2, max_lora_rank=16, max_running=32, max_queue=1024,
                                  max_model_len=256, registry_ttl=5.0))
    yield s, sorted(f"soak-{n}" for n in folders)
    s.stop()
    if old is None:
        os.environ.pop("LORAPLEX_HOME", None)
    else:
        os.environ["LORAPLEX_HOME"] = old


def test_200_streams_for_a_minute(server):
    live, names = server
    models = names + ["tiny-base"]
    api_pid, engine_pid = os.getpid(), live.backend._proc.pid
    before = (_rss_mb(api_pid), _rss_mb(engine_pid))
    counts = {"complete": 0, "hung_up": 0, "errors": 0, "tokens": 0}
    errors: list[str] = []

    async def client(i: int, deadline: float) -> None:
        rng = random.Random(i)
        http = httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=2))
        oa = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, http_client=http)
        try:
            while time.monotonic() < deadline:
                hang_up = rng.random() < 0.1
                try:
                    stream = await oa.chat.completions.create(
                        model=rng.choice(models), messages=MSG, max_tokens=rng.randint(4, 24), temperature=0.7,
                        stream=True, extra_body={"ignore_eos": True})
                    n = 0
                    async for chunk in stream:
                        if chunk.choices and chunk.choices[0].delta.content:
                            n += 1
                            if hang_up:
                                break
                    await stream.close()
                    counts["hung_up" if hang_up else "complete"] += 1
                    counts["tokens"] += n
                except Exception as exc:  # noqa: BLE001  every failure counts
                    counts["errors"] += 1
                    errors.append(f"{type(exc).__name__}: {str(exc)[:120]}")
        finally:
            await http.aclose()

    async def main() -> None:
        deadline = time.monotonic() + SECONDS
        await asyncio.gather(*(client(i, deadline) for i in range(CLIENTS)))

    started = time.monotonic()
    asyncio.run(main())
    elapsed = time.monotonic() - started
    time.sleep(1.0)
    after = (_rss_mb(api_pid), _rss_mb(engine_pid))
    stats = httpx.get(live.url + "/metrics", timeout=10).text
    print(f"\nsoak: {CLIENTS} clients, {elapsed:.0f} s: {counts['complete']} complete, {counts['hung_up']} hung up, "
          f"{counts['errors']} errors, {counts['tokens']} streamed chunks; RSS MB api {before[0]:.0f} -> {after[0]:.0f}, "
          f"engine {before[1]:.0f} -> {after[1]:.0f}")
    assert counts["errors"] == 0, errors[:5]
    assert counts["complete"] > CLIENTS and counts["hung_up"] > 0
    assert "loraplex_adapter_evictions_total" in stats
    evictions = [float(x.split()[-1]) for x in stats.splitlines() if x.startswith("loraplex_adapter_evictions_total")]
    assert evictions and evictions[0] > 0  # adapters really went cold and came back
    assert after[1] < before[1] * 1.5 + 200 and after[0] < before[0] * 1.5 + 200  # no runaway growth
    assert live.backend.stats()["running"] == 0 or time.sleep(2) or live.backend.stats()["running"] == 0
