"""The load of the kill -9 tests (native engine child, vLLM's engine core): four streams and a plain request on
a live server; ``kill()`` runs once every stream has its first token. Every client must end with a complete
answer or a clean error (an OpenAI error envelope or the stream's error event), none may hang, and ``/ready``
must answer 503 while the engine is down."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx
import openai

MSG = [{"role": "user", "content": "w10 w11 w12"}]


def kill_under_load(url: str, kill: Callable[[], None], adapter: str = "helper", wait: float = 60) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    results: dict[str, str] = {}
    started = threading.Barrier(6)  # 4 streams, the plain request, this thread

    def stream(i: int) -> None:
        model = adapter if i % 2 else "tiny-base"
        try:
            first = True
            for _ in client.chat.completions.create(model=model, messages=MSG, max_tokens=1500, temperature=0,
                                                    stream=True, extra_body={"ignore_eos": True}):
                if first:
                    first = False
                    started.wait(wait)
            results[f"s{i}"] = "complete"
        except openai.APIError as exc:  # the stream's error event or an error status: a clean error
            results[f"s{i}"] = f"error: {exc.message[:80]}"
        except Exception as exc:  # noqa: BLE001  anything else is a failure of the contract
            results[f"s{i}"] = f"UNCLEAN {type(exc).__name__}: {exc}"

    def plain() -> None:
        started.wait(wait)
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
    started.wait(2 * wait)  # every stream has its first token, the plain request is sent
    time.sleep(0.2)
    kill()
    killed_at = time.monotonic()
    saw_unready = False
    while time.monotonic() - killed_at < 5 and not saw_unready:
        saw_unready = httpx.get(url + "/ready", timeout=5).status_code == 503
        time.sleep(0.05)
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a client hangs"
    assert len(results) == 5 and not [r for r in results.values() if r.startswith("UNCLEAN")], results
    assert any(r.startswith("error") for r in results.values()), results  # the kill did cut requests short
    assert results["plain"] in ("complete", "error 503"), results
    assert saw_unready, "/ready never answered 503 while the engine was down"


def wait_ready(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while httpx.get(url + "/ready", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "the engine did not come back"
        time.sleep(0.2)
