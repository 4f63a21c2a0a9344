"""``loraplex bench serve``: the pure parts (schedule, popularity, percentiles, specs), and one live run
against the real loraplex server on a tiny model."""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter

import pytest

from loraplex.server import loadgen
from loraplex.server.loadgen import Dist, Result, SpecError, Workload


# ---- schedule -------------------------------------------------------------------------------------------
def test_poisson_mean_rate_for_a_seeded_run():
    times = loadgen.arrival_schedule(20.0, duration=100.0, rng=random.Random(7))
    assert abs(len(times) / 100.0 - 20.0) < 20.0 * 0.05  # 2000 expected, sd ~45
    assert times == sorted(times) and 0 < times[0] and times[-1] < 100.0
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert abs(sum(gaps) / len(gaps) - 0.05) < 0.005
    assert times == loadgen.arrival_schedule(20.0, duration=100.0, rng=random.Random(7))  # seeded


def test_schedule_is_bounded_by_duration_and_requests():
    assert len(loadgen.arrival_schedule(100.0, duration=100.0, requests=10)) == 10
    assert max(loadgen.arrival_schedule(100.0, duration=0.5, requests=10_000)) < 0.5
    few = loadgen.arrival_schedule(1e6, requests=None, duration=1.0)
    assert len(few) == loadgen.MAX_REQUESTS  # the hard cap holds whatever the options say
    assert max(loadgen.arrival_schedule(0.01, requests=10_000)) < loadgen.MAX_DURATION
    for bad in (dict(rate=0, duration=1), dict(rate=float("inf"), duration=1), dict(rate=1)):
        with pytest.raises(ValueError):
            loadgen.arrival_schedule(**bad)


# ---- popularity and planning ------------------------------------------------------------------------------
def test_zipf_popularity_shares_for_a_seeded_draw():
    assert loadgen.popularity_weights(4, "zipf") == pytest.approx([12 / 25, 6 / 25, 4 / 25, 3 / 25])
    assert loadgen.popularity_weights(3, "uniform") == pytest.approx([1 / 3] * 3)
    assert loadgen.popularity_weights(2, "zipf", s=2.0) == pytest.approx([0.8, 0.2])
    w = Workload(["a0", "a1", "a2", "a3"], popularity="zipf", duration=None, requests=5000, seed=3)
    counts = Counter(p.model for p in loadgen.plan(w, rate=100.0))
    for name, want in zip(w.adapters, loadgen.popularity_weights(4, "zipf")):
        assert abs(counts[name] / 5000 - want) < 0.02, (name, counts)
    with pytest.raises(ValueError):
        loadgen.popularity_weights(3, "pareto")


def test_plan_base_share_lengths_and_seed():
    w = Workload(["a", "b"], base="base", base_share=0.25, prompt_words=Dist(3, 5), max_tokens=Dist(8, 8),
                 duration=None, requests=2000, seed=1)
    planned = loadgen.plan(w, rate=50.0)
    share = sum(p.model == "base" for p in planned) / len(planned)
    assert abs(share - 0.25) < 0.03
    assert all(p.max_tokens == 8 and 3 <= len(p.prompt.split(": ", 1)[1].split()) <= 5 for p in planned)
    assert [p.prompt for p in planned] == [p.prompt for p in loadgen.plan(w, rate=50.0)]
    assert [p.prompt for p in planned] != [p.prompt for p in loadgen.plan(w, rate=50.0, seed=2)]
    only_base = Workload([], base="base", base_share=0.0, duration=None, requests=5)
    assert {p.model for p in loadgen.plan(only_base, 1.0)} == {"base"}


# ---- percentiles and summaries ------------------------------------------------------------------------------
def test_percentile_matches_linear_interpolation():
    np = pytest.importorskip("numpy")
    xs = [5.0, 1.0, 9.0, 3.0, 7.0, 2.5]
    for q in (0, 10, 50, 90, 99, 100):
        assert loadgen.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert loadgen.percentile([], 50) is None and loadgen.percentile([None], 50) is None
    assert loadgen.percentile([4.0], 99) == 4.0


def test_summary_tpot_itl_and_errors():
    ok = Result("a", sent=0.0, ok=True, ttft=0.1, e2e=0.5, tokens=5, chunks=[0.1, 0.3, 0.5])  # 2 chunks of 2 tokens
    bad = Result("b", sent=0.2, error="http_429")
    assert ok.gaps == pytest.approx([0.2, 0.2]) and ok.tpot == pytest.approx(0.1)
    s = loadgen.summarize([ok, bad], offered=2.0, wall=1.0)
    assert s["completed"] == 1 and s["requests"] == 2 and s["errors"] == {"http_429": 1}
    assert s["itl_p50_ms"] == pytest.approx(200.0) and s["tpot_p50_ms"] == pytest.approx(100.0)
    assert s["output_tok_s"] == 5.0 and s["ttft_p50_ms"] == pytest.approx(100.0)
    assert loadgen.window_gaps([ok], 0.35, 0.4) == pytest.approx([0.2])  # a stall spanning the window counts
    assert loadgen.window_gaps([ok], 0.6, 0.9) == []


# ---- specs -------------------------------------------------------------------------------------------------------
def test_length_specs_and_clear_errors():
    assert loadgen.parse_dist("fixed:20") == Dist(20, 20)
    assert loadgen.parse_dist("uniform:10:40") == Dist(10, 40)
    rng = random.Random(0)
    assert {Dist(2, 4).sample(rng) for _ in range(200)} == {2, 3, 4}
    for bad in ("20", "fixed:0", "fixed:x", "uniform:5", "uniform:9:3", "normal:3:4", ""):
        with pytest.raises(ValueError, match="fixed:N or uniform:LO:HI"):
            loadgen.parse_dist(bad)
    assert issubclass(SpecError, argparse.ArgumentTypeError)
    assert loadgen.parse_rates("1,2,4.5") == [1.0, 2.0, 4.5]
    with pytest.raises(ValueError, match="positive numbers"):
        loadgen.parse_rates("1,-2")


def test_cli_errors(capsys):
    with pytest.raises(SystemExit):
        loadgen.main(["--url", "http://127.0.0.1:9", "--adapters", "a", "--prompt-words", "uniform:4:2"])
    assert "bad length spec 'uniform:4:2'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        loadgen.main(["--adapters", "a"])
    assert "--url is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        loadgen.main(["--url", "http://127.0.0.1:9", "--adapters", "a", "--cold-adapter", "b", "--cold-streams", "-1"])
    assert "--cold-streams and --cold-stream-tokens must be positive" in capsys.readouterr().err


# ---- live: the real loraplex server on a tiny model ------------------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from loraplex.adapters import AdapterCache, AdapterRegistry
    from engine_fixtures import make_peft_adapters
    from loraplex.server.api.settings import ServerSettings
    from server_fixtures import LiveServer, free_port, save_tiny_base

    root = tmp_path_factory.mktemp("loadgen")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPLEX_HOME", str(root / "home"))
        base = save_tiny_base(root / "tiny-base")
        folders = make_peft_adapters(root / "peft")
        reg_uri = (root / "registry").as_uri()
        reg = AdapterRegistry(reg_uri, cache=AdapterCache(root / "cache"))
        for i, folder in enumerate(folders.values()):
            reg.push(folder, f"a{i}", base_model=str(base))
        reg.push(folders["qv4"], "cold", base_model=str(base))
        server = LiveServer(ServerSettings(model=str(base), quantize="none", dtype="float32", registry=reg_uri,
                                           port=free_port(), max_lora_rank=32, max_model_len=256, registry_ttl=0.0))
        yield server
        server.stop()


@pytest.mark.slow
def test_live_sweep_plot_compare_and_cold_probe(live, tmp_path, capsys):
    from loraplex.server.commands import cmd_bench

    out = tmp_path / "ours.json"
    png = tmp_path / "lat.png"
    opts = ["--url", live.url, "--adapters", "a0,a1,a2", "--popularity", "zipf", "--rate", "4", "--duration", "3",
            "--max-tokens", "fixed:8", "--prompt-words", "uniform:5:15", "--ignore-eos", "--label", "loraplex",
            "--timeout", "20", "--json", "--plot", str(png)]
    assert cmd_bench(argparse.Namespace(target="serve", options=opts)) == 0
    report = json.loads(capsys.readouterr().out)
    (s,) = report["results"]
    print("sweep:", json.dumps(s))
    assert report["label"] == "loraplex" and s["offered_rate"] == 4.0
    assert s["requests"] >= 3 and s["completed"] == s["requests"] and s["errors"] == {}
    assert s["achieved_rps"] > 0 and s["output_tok_s"] > 0 and s["output_tokens"] == 8 * s["requests"]
    for m in ("ttft", "itl", "e2e"):
        assert s[f"{m}_p50_ms"] is not None and 0 < s[f"{m}_p50_ms"] <= s[f"{m}_p99_ms"]
    assert s["tpot_p50_ms"] > 0 and set(s["by_model"]) <= {"a0", "a1", "a2"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the cold probe: background on a0..a2, one request to the never-loaded "cold" adapter
    opts = ["--url", live.url, "--adapters", "a0,a1,a2", "--rate", "4", "--max-tokens", "fixed:8", "--ignore-eos",
            "--cold-adapter", "cold", "--cold-warm", "--cold-window", "1", "--label", "cold-run", "--json", str(out)]
    assert loadgen.main(opts) == 0
    report = json.loads(out.read_text())["cold"]
    print("cold:", json.dumps({k: v for k, v in report.items() if k != "background"}))
    cold, warm = report["probes"]
    assert (cold["adapter"], cold["state"], warm["adapter"], warm["state"]) == ("cold", "cold", "cold", "warm")
    assert cold["ok"] and warm["ok"] and cold["ttft_ms"] > 0 and report["background"]["errors"] == {}
    assert cold["bg_itl_p50_before_ms"] is not None and report["cold_ttft_max_ms"] == cold["ttft_ms"]

    # the same adapter again (resident now) with a steady background: three streams that start
    # together and outlast the probe, so the window holds their decode steps and nothing else
    steady = tmp_path / "steady.json"
    opts = ["--url", live.url, "--adapters", "a0,a1,a2", "--max-tokens", "fixed:8", "--ignore-eos", "--cold-adapter",
            "cold", "--cold-window", "0.2", "--cold-streams", "3", "--cold-stream-tokens", "200", "--json", str(steady)]
    assert loadgen.main(opts) == 0
    report = json.loads(steady.read_text())["cold"]
    (warm,), bg = report["probes"], report["background"]
    assert warm["ok"] and bg["requests"] == 3 and bg["errors"] == {} and bg["output_tokens"] == 3 * 200
    print("steady:", json.dumps(warm), bg["itl_p50_ms"])
    assert warm["bg_itl_p50_before_ms"] is not None and warm["bg_itl_p50_during_ms"] is not None

    report_path = tmp_path / "first.json"
    report_path.write_text(json.dumps(report))
    both = tmp_path / "both.png"
    assert loadgen.main(["--compare", str(report_path), str(out), "--plot", str(both)]) == 0
    assert both.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
