"""Prometheus metrics: names and labels, bounded cardinality, monotonic counters, and per_arm."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraplex.server.api.metrics import Metrics, per_arm, quantile


def samples(m: Metrics) -> dict[tuple, float]:
    body, content_type = m.render()
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: Metrics, name: str, **labels) -> float | None:
    return samples(m).get((name, tuple(sorted(labels.items()))))


def test_exact_names_and_labels():
    m = Metrics()
    m.observe_request("acme", 3, "ok", prompt_tokens=12, generation_tokens=5, ttft=0.3,
                      inter_token=[0.02, 0.04], e2e=1.2)
    m.observe_request("acme", 3, "error")
    m.observe_request(None, None, "ok", 4, 2, 0.1, [0.01], 0.5)
    m.set_engine({"waiting": 2, "running": 3, "last_batch_tokens": 7, "kv_slots_used": 5, "kv_slots_total": 16})
    m.set_adapter_cache(10, 2, 2, 1, [0.2, 0.4])
    body = m.render()[0].decode()

    for line in [
        'loraplex_requests_total{adapter="acme",outcome="ok",version="3"} 1.0',
        'loraplex_requests_total{adapter="acme",outcome="error",version="3"} 1.0',
        'loraplex_requests_total{adapter="base",outcome="ok",version=""} 1.0',
        'loraplex_prompt_tokens_total{adapter="acme",version="3"} 12.0',
        'loraplex_generation_tokens_total{adapter="acme",version="3"} 5.0',
        'loraplex_generation_tokens_total{adapter="base",version=""} 2.0',
        'loraplex_ttft_seconds_count{adapter="acme"} 1.0',
        'loraplex_inter_token_seconds_count{adapter="acme"} 2.0',
        'loraplex_inter_token_seconds_bucket{adapter="acme",le="0.005"} 0.0',
        'loraplex_ttft_seconds_bucket{adapter="acme",le="60.0"} 1.0',
        'loraplex_e2e_seconds_count{adapter="acme",version="3"} 1.0',
        'loraplex_e2e_seconds_sum{adapter="acme",version="3"} 1.2',
        'loraplex_e2e_seconds_count{adapter="base",version=""} 1.0',
        "loraplex_queue_depth 2.0",
        "loraplex_running_requests 3.0",
        "loraplex_batch_tokens 7.0",
        "loraplex_kv_slots_used 5.0",
        "loraplex_kv_slots_total 16.0",
        "loraplex_adapter_cache_hits_total 10.0",
        "loraplex_adapter_cache_misses_total 2.0",
        "loraplex_adapter_loads_total 2.0",
        "loraplex_adapter_evictions_total 1.0",
        "loraplex_adapter_load_seconds_count 2.0",
    ]:
        assert line in body.splitlines(), line
    # errors are counted but their latency does not enter the e2e histogram
    assert 'loraplex_e2e_seconds_count{adapter="acme",version="3"} 1.0' in body


def test_registries_are_per_instance():
    a, b = Metrics(), Metrics()
    a.observe_request("x", 1, "ok")
    assert value(a, "loraplex_requests_total", adapter="x", version="1", outcome="ok") == 1
    assert value(b, "loraplex_requests_total", adapter="x", version="1", outcome="ok") is None


def test_bad_outcome():
    with pytest.raises(ValueError, match="unknown outcome"):
        Metrics().observe_request("x", 1, "timeout")


def test_adapter_cardinality_cap():
    m = Metrics(max_adapters=3, max_versions=2)
    for name in ["a", "b", "c", "d", "e"]:
        m.observe_request(name, 1, "ok", generation_tokens=1)
    m.observe_request("a", 1, "ok", generation_tokens=1)  # the first ones keep their label for good
    m.observe_request(None, None, "ok")  # base never takes a place
    m.observe_request("other", None, "rejected")  # an unresolved model, recorded as other
    s = samples(m)
    adapters = {dict(k[1])["adapter"] for k in s if k[0] == "loraplex_requests_total"}
    assert adapters == {"a", "b", "c", "other", "base"}
    assert s[("loraplex_generation_tokens_total", (("adapter", "a"), ("version", "1")))] == 2
    assert s[("loraplex_generation_tokens_total", (("adapter", "other"), ("version", "")))] == 2
    assert m.labels("f", 9) == ("other", "")
    assert m.labels("base", 4) == ("base", "")

    # versions: two per adapter, then "other"
    assert [m.labels("a", v) for v in (1, 2, 3, 2, "4")] == [("a", "1"), ("a", "2"), ("a", "other"), ("a", "2"), ("a", "other")]


def test_cumulative_totals_become_monotonic_counters():
    m = Metrics()
    m.set_adapter_cache(5, 1, 1, 0, [0.3])
    m.set_adapter_cache(5, 1, 1, 0)  # nothing new
    m.set_adapter_cache(9, 3, 2, 1, [0.6])
    assert value(m, "loraplex_adapter_cache_hits_total") == 9
    assert value(m, "loraplex_adapter_cache_misses_total") == 3
    assert value(m, "loraplex_adapter_loads_total") == 2
    assert value(m, "loraplex_adapter_evictions_total") == 1
    assert value(m, "loraplex_adapter_load_seconds_count") == 2
    assert value(m, "loraplex_adapter_load_seconds_sum") == pytest.approx(0.9)
    m.set_adapter_cache(2, 0, 0, 0)  # the engine restarted: its totals start again from zero
    assert value(m, "loraplex_adapter_cache_hits_total") == 11
    m.set_adapter_cache(4, 0, 0, 0)
    assert value(m, "loraplex_adapter_cache_hits_total") == 13
    assert value(m, "loraplex_adapter_cache_misses_total") == 3


def test_update_from_adapter_stats_object():
    m = Metrics()
    stats = SimpleNamespace(hits=1, misses=1, loads=1, evictions=0, load_seconds=[0.1])
    m.update_adapter_cache(stats)
    m.update_adapter_cache(stats)  # the same list again: nothing observed twice
    stats.hits, stats.loads = 4, 2
    stats.load_seconds.append(0.2)
    m.update_adapter_cache(stats)
    assert value(m, "loraplex_adapter_cache_hits_total") == 4
    assert value(m, "loraplex_adapter_loads_total") == 2
    assert value(m, "loraplex_adapter_load_seconds_count") == 2
    assert value(m, "loraplex_adapter_load_seconds_sum") == pytest.approx(0.3)


def test_set_engine_from_dataclass_like_object():
    m = Metrics()
    m.set_engine(SimpleNamespace(running=1, waiting=4, kv_slots_used=2, kv_slots_total=8, last_batch_tokens=3, steps=9))
    m.set_engine({"queue_depth": 6})  # the server's own queue, if it has one; others stay as they are
    assert value(m, "loraplex_queue_depth") == 6
    assert value(m, "loraplex_running_requests") == 1
    assert value(m, "loraplex_kv_slots_total") == 8
    assert value(m, "loraplex_batch_tokens") == 3


def test_request_timer():
    now = [100.0]
    m = Metrics()
    t = m.start_request("acme", 2, prompt_tokens=7, clock=lambda: now[0])
    now[0] += 0.5
    t.tokens()
    now[0] += 0.1
    t.tokens(2)  # a chunk of two tokens: 0.05 s each
    now[0] += 0.4
    t.finish("ok")
    t.finish("error")  # once only
    assert t.ttft == pytest.approx(0.5) and t.inter_token == pytest.approx([0.05, 0.05])
    assert value(m, "loraplex_requests_total", adapter="acme", version="2", outcome="ok") == 1
    assert value(m, "loraplex_requests_total", adapter="acme", version="2", outcome="error") is None
    assert value(m, "loraplex_generation_tokens_total", adapter="acme", version="2") == 3
    assert value(m, "loraplex_prompt_tokens_total", adapter="acme", version="2") == 7
    assert value(m, "loraplex_e2e_seconds_sum", adapter="acme", version="2") == pytest.approx(1.0)
    assert value(m, "loraplex_inter_token_seconds_count", adapter="acme") == 2


def test_request_timer_as_context_manager():
    m = Metrics()
    with m.start_request("a", 1):
        pass
    with pytest.raises(RuntimeError):
        with m.start_request("a", 1):
            raise RuntimeError("boom")

    async def cancelled():
        with m.start_request("a", 1) as t:
            t.tokens()
            await asyncio.sleep(10)

    async def main():
        task = asyncio.create_task(cancelled())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    for outcome in ("ok", "error", "aborted"):
        assert value(m, "loraplex_requests_total", adapter="a", version="1", outcome=outcome) == 1, outcome
    assert value(m, "loraplex_e2e_seconds_count", adapter="a", version="1") == 1  # ok only
    assert value(m, "loraplex_ttft_seconds_count", adapter="a") == 1  # the aborted one had a token


def test_per_arm_round_trip():
    m = Metrics()
    for e2e in (0.3, 0.4, 0.6, 0.8):  # all in the (0.25, 0.5] and (0.5, 1.0] buckets
        m.observe_request("acme", 1, "ok", 10, 20, 0.1, [], e2e)
    m.observe_request("acme", 1, "error", 10, 0)
    m.observe_request("acme", 2, "ok", 5, 8, 0.1, [], 4.0)
    m.observe_request("acme", 2, "aborted", 5, 3)
    m.observe_request("acme", 3, "rejected")
    m.observe_request("globex", 1, "ok", 1, 1, 0.1, [], 9.0)
    arms = per_arm(m.render()[0].decode(), "acme")

    assert set(arms) == {"1", "2", "3"}
    one = arms["1"]
    assert (one["requests"], one["errors"], one["generation_tokens"], one["prompt_tokens"]) == (5, 1, 80, 50)
    assert one["e2e_mean"] == pytest.approx(0.525)
    # rank 2 of 4 is the last of the two in (0.25, 0.5]: the bucket's upper bound
    assert one["e2e_p50"] == pytest.approx(0.5)
    two = arms["2"]
    assert (two["requests"], two["errors"], two["aborted"], two["generation_tokens"]) == (2, 0, 1, 11)
    assert two["e2e_mean"] == pytest.approx(4.0) and 3.0 < two["e2e_p50"] <= 5.0
    assert arms["3"] == {"requests": 1, "errors": 0, "aborted": 0, "rejected": 1, "prompt_tokens": 0,
                         "generation_tokens": 0, "e2e_p50": None, "e2e_mean": None}
    assert per_arm(m.render()[0].decode(), "nobody") == {}
    assert set(per_arm(m.render()[0].decode(), "base")) == set()


def test_quantile():
    assert quantile([], 0.5) is None
    assert quantile([(1.0, 0), (float("inf"), 0)], 0.5) is None
    assert quantile([(1.0, 10), (2.0, 20), (float("inf"), 20)], 0.5) == pytest.approx(1.0)
    assert quantile([(1.0, 0), (2.0, 10), (float("inf"), 10)], 0.5) == pytest.approx(1.5)
    assert quantile([(1.0, 0), (2.0, 0), (float("inf"), 4)], 0.5) == pytest.approx(2.0)  # +Inf: highest bound


def test_a_bounded_window_of_load_times_with_their_count():
    """The engine process keeps only the latest load durations; the count says how many there were in all."""
    m = Metrics()
    m.update_adapter_cache(SimpleNamespace(hits=0, misses=3, loads=3, evictions=0, load_seconds=[0.1, 0.2, 0.3],
                                           load_seconds_count=3))
    # five more loads happened, the window now holds the latest three of all eight
    m.update_adapter_cache(SimpleNamespace(hits=0, misses=8, loads=8, evictions=0, load_seconds=[0.6, 0.7, 0.8],
                                           load_seconds_count=8))
    assert value(m, "loraplex_adapter_load_seconds_count") == 6  # 3 + the 3 still listed (2 fell out unseen)
    m.update_adapter_cache(SimpleNamespace(hits=0, misses=9, loads=9, evictions=0, load_seconds=[0.7, 0.8, 0.9],
                                           load_seconds_count=9))
    assert value(m, "loraplex_adapter_load_seconds_count") == 7
    assert value(m, "loraplex_adapter_load_seconds_sum") == pytest.approx(0.6 + 2.1 + 0.9)


def test_kv_blocks_and_preemptions_from_the_engine():
    m = Metrics()
    m.set_engine({"kv_blocks_used": 12, "kv_blocks_total": 4096, "preemptions": 3})
    m.set_engine({"kv_blocks_used": 0, "kv_blocks_total": 4096, "preemptions": 5})
    assert value(m, "loraplex_kv_blocks_used") == 0 and value(m, "loraplex_kv_blocks_total") == 4096
    assert value(m, "loraplex_preemptions_total") == 5


def test_prefix_cache_counters_per_adapter_label():
    m = Metrics(max_adapters=1)
    m.set_engine({"kv_blocks_cached": 7, "prefix_by_adapter": {"base": (100, 48), "acme@3": (40, 32), "zed@1": (5, 0),
                                                                "merge-abc": (9, 0)}})
    m.set_engine({"prefix_by_adapter": {"base": (150, 96), "acme@3": (40, 32)}})  # cumulative: only the increase
    assert value(m, "loraplex_kv_blocks_cached") == 7
    assert value(m, "loraplex_prefix_cache_hit_tokens_total", adapter="base") == 96
    assert value(m, "loraplex_prefix_cache_queried_tokens_total", adapter="base") == 150
    assert value(m, "loraplex_prefix_cache_hit_tokens_total", adapter="acme") == 32
    assert value(m, "loraplex_prefix_cache_queried_tokens_total", adapter="other") == 14  # zed past the bound, a merge
