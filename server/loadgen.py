"""``loraplex bench serve``: an open-loop load generator for any OpenAI-compatible server (loraplex, vLLM).

Poisson arrivals at one or more offered rates, adapter popularity (uniform or Zipf by rank, plus an optional
share of base-model requests), generated prompts, streaming chat completions through the official ``openai``
client; per request TTFT, chunk gaps (ITL), per-token time (TPOT), end-to-end latency, tokens and errors.
Always bounded: at most ``--duration`` seconds (or ``--requests``) of arrivals per rate, each request capped by
``--timeout``. ``--cold-adapter`` probes cold adapters' first tokens under background load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

MAX_REQUESTS = 100_000  # hard caps, whatever the options say
MAX_DURATION = 3600.0
WORDS = ("the quick brown fox jumps over a lazy dog while seven tired cats watch from an old red barn near "
         "river under bright morning light and distant hills echo with birds singing about summer rain").split()


class SpecError(argparse.ArgumentTypeError, ValueError):
    """A bad option value; argparse prints its message as is."""


@dataclass(frozen=True)
class Dist:
    """An integer length distribution: ``fixed:N`` or ``uniform:LO:HI`` (inclusive)."""
    lo: int
    hi: int

    def sample(self, rng: random.Random) -> int:
        return self.lo if self.lo == self.hi else rng.randint(self.lo, self.hi)


def parse_dist(spec: str) -> Dist:
    kind, *nums = str(spec).strip().split(":")
    if all(n.isdigit() for n in nums):
        nums = [int(n) for n in nums]
        if kind == "fixed" and len(nums) == 1 and nums[0] >= 1:
            return Dist(nums[0], nums[0])
        if kind == "uniform" and len(nums) == 2 and 1 <= nums[0] <= nums[1]:
            return Dist(nums[0], nums[1])
    raise SpecError(f"bad length spec {spec!r}: expected fixed:N or uniform:LO:HI with integers 1 <= LO <= HI")


def parse_rates(spec: str) -> list[float]:
    try:
        rates = [float(r) for r in str(spec).split(",")]
    except ValueError:
        rates = []
    if not rates or not all(0 < r < math.inf for r in rates):
        raise SpecError(f"bad rates {spec!r}: expected positive numbers separated by commas, like 1,2,4,8")
    return rates


@dataclass
class Workload:
    adapters: list[str]
    base: str | None = None
    base_share: float = 0.0
    popularity: str = "uniform"  # or "zipf"
    zipf_s: float = 1.0
    prompt_words: Dist = Dist(20, 20)
    max_tokens: Dist = Dist(64, 64)
    duration: float | None = 10.0
    requests: int | None = None
    seed: int = 0


@dataclass
class Planned:
    at: float  # seconds after the run's start
    model: str
    prompt: str
    max_tokens: int


@dataclass
class Result:
    model: str
    sent: float  # seconds after the run's start
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    tokens: int = 0
    chunks: list[float] = field(default_factory=list)  # content chunk arrivals, seconds after the run's start

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:])]

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.tokens - 1) if self.ok and self.ttft is not None and self.tokens > 1 else None


# ---- pure parts: schedule, popularity, percentiles -------------------------------------------------------
def arrival_schedule(rate: float, duration: float | None = None, requests: int | None = None,
                     rng: random.Random | None = None) -> list[float]:
    """Poisson arrival times (exponential gaps, mean 1/rate) in [0, duration), at most ``requests`` of them."""
    if not rate > 0 or not math.isfinite(rate):
        raise SpecError(f"rate must be a positive number, not {rate}")
    if duration is None and requests is None:
        raise SpecError("give a duration or a number of requests")
    rng = rng or random.Random(0)
    limit = min(duration if duration is not None else MAX_DURATION, MAX_DURATION)
    cap = min(requests if requests is not None else MAX_REQUESTS, MAX_REQUESTS)
    out, t = [], rng.expovariate(rate)
    while t < limit and len(out) < cap:
        out.append(t)
        t += rng.expovariate(rate)
    return out


def popularity_weights(n: int, popularity: str = "uniform", s: float = 1.0) -> list[float]:
    """Share of each of ``n`` adapters: equal, or Zipf(s) by rank (the first is the most popular)."""
    if popularity == "uniform":
        raw = [1.0] * n
    elif popularity == "zipf":
        raw = [1.0 / (k + 1) ** s for k in range(n)]
    else:
        raise SpecError(f"popularity must be uniform or zipf, not {popularity!r}")
    total = sum(raw)
    return [w / total for w in raw]


def _words(w: Workload, rng: random.Random) -> str:
    """A prompt body: the workload's number of words, drawn from WORDS."""
    return " ".join(rng.choice(WORDS) for _ in range(w.prompt_words.sample(rng)))


def plan(w: Workload, rate: float, seed: int | None = None) -> list[Planned]:
    rng = random.Random(w.seed if seed is None else seed)
    times = arrival_schedule(rate, w.duration, w.requests, rng)
    weights = popularity_weights(len(w.adapters), w.popularity, w.zipf_s)
    out = []
    for i, at in enumerate(times):
        use_base = w.base is not None and (not w.adapters or rng.random() < w.base_share)
        model = w.base if use_base else rng.choices(w.adapters, weights)[0]
        out.append(Planned(at, model, f"Request {i}: {_words(w, rng)}", w.max_tokens.sample(rng)))
    return out


def percentile(values, q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation, as numpy's default; None when empty."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None
    k = (len(xs) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000.0, 3)


def summarize(results: list[Result], offered: float, wall: float) -> dict:
    ok = [r for r in results if r.ok]
    gaps = [g for r in ok for g in r.gaps]
    tokens = sum(r.tokens for r in ok)
    wall = max(wall, 1e-9)
    return {"offered_rate": offered, "duration_s": round(wall, 3), "requests": len(results), "completed": len(ok),
            "achieved_rps": round(len(ok) / wall, 3), "output_tok_s": round(tokens / wall, 2),
            "output_tokens": tokens,
            "ttft_p50_ms": _ms(percentile([r.ttft for r in ok], 50)), "ttft_p99_ms": _ms(percentile([r.ttft for r in ok], 99)),
            "itl_p50_ms": _ms(percentile(gaps, 50)), "itl_p99_ms": _ms(percentile(gaps, 99)),
            "tpot_p50_ms": _ms(percentile([r.tpot for r in ok], 50)),
            "e2e_p50_ms": _ms(percentile([r.e2e for r in ok], 50)), "e2e_p99_ms": _ms(percentile([r.e2e for r in ok], 99)),
            "errors": dict(Counter(r.error for r in results if not r.ok)),
            "by_model": dict(Counter(r.model for r in results))}


def window_gaps(results: list[Result], t0: float, t1: float) -> list[float]:
    """Chunk gaps of the given streams that overlap [t0, t1] (a stall spanning the window counts)."""
    return [b - a for r in results for a, b in zip(r.chunks, r.chunks[1:]) if a < t1 and b > t0]


# ---- the async runner ------------------------------------------------------------------------------------
def _error_kind(exc: BaseException) -> str:
    import openai

    if isinstance(exc, openai.APIStatusError):
        return f"http_{exc.status_code}"  # 429 (queue full), 404 (unknown model), 5xx...
    kinds = [((openai.APITimeoutError, asyncio.TimeoutError), "timeout"), (openai.APIConnectionError, "connection"),
             (openai.APIError, "stream_error")]  # stream_error: an error event inside the stream
    return next((k for t, k in kinds if isinstance(exc, t)), type(exc).__name__)


async def _one(client, p: Planned, t0: float, ignore_eos: bool, timeout: float) -> Result:
    r = Result(p.model, time.perf_counter() - t0)
    start = time.perf_counter()

    async def stream() -> None:
        extra = {"ignore_eos": True} if ignore_eos else None
        s = await client.chat.completions.create(
            model=p.model, messages=[{"role": "user", "content": p.prompt}], max_tokens=p.max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body=extra)
        async for c in s:
            if c.choices and c.choices[0].delta.content:
                r.chunks.append(time.perf_counter() - t0)
            if getattr(c, "usage", None) is not None:
                r.tokens = c.usage.completion_tokens

    try:
        await asyncio.wait_for(stream(), timeout)
        r.ok, r.tokens = True, r.tokens or len(r.chunks)
    except Exception as exc:  # noqa: BLE001 - every failure is counted by kind
        r.error = _error_kind(exc)
    r.e2e = time.perf_counter() - start
    r.ttft = r.chunks[0] - r.sent if r.chunks else None
    return r


async def run_planned(client, planned: list[Planned], ignore_eos: bool, timeout: float,
                      t0: float | None = None) -> list[Result]:
    t0 = time.perf_counter() if t0 is None else t0
    tasks = []
    for p in planned:
        delay = t0 + p.at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_one(client, p, t0, ignore_eos, timeout)))
    return list(await asyncio.gather(*tasks))


async def _client(a: argparse.Namespace, w: Workload):
    """The client (no retries: a 429 counts as one); warmed by one short request per model unless --no-warmup."""
    import openai

    base = a.url.rstrip("/")
    client = openai.AsyncOpenAI(base_url=base if base.endswith("/v1") else base + "/v1", api_key=a.api_key,
                                max_retries=0, timeout=a.timeout)
    models = list(w.adapters) + ([w.base] if w.base else [])
    if a.warmup:
        await asyncio.gather(*(_one(client, Planned(0, m, "Hello", 2), time.perf_counter(), False, a.timeout)
                               for m in models))
    return client


async def sweep(a: argparse.Namespace, w: Workload, rates: list[float]) -> list[dict]:
    client = await _client(a, w)
    out = []
    for i, rate in enumerate(rates):
        t0 = time.perf_counter()
        results = await run_planned(client, plan(w, rate, w.seed + i), a.ignore_eos, a.timeout, t0)
        out.append(summarize(results, rate, time.perf_counter() - t0))
        print(_row(out[-1]), file=sys.stderr if a.json_out == "-" else sys.stdout, flush=True)
    await client.close()
    return out


async def cold_probe(a: argparse.Namespace, w: Workload, rate: float) -> dict:
    """Background load on ``w``'s adapters; every ``window`` seconds one request to the next cold adapter
    (and with ``--cold-warm`` the same adapter again a window later: the control, what a new request
    costs the other streams by itself when nothing has to load). Each probe compares the background's
    inter-token gaps in its window (sent to first token) with the window before it."""
    client = await _client(a, w)
    window = a.cold_window
    names = [x.strip() for x in a.cold_adapter.split(",") if x.strip()]
    probes = [(n, state) for n in names for state in (("cold", "warm") if a.cold_warm else ("cold",))]
    span = window * (len(probes) + 1) + 1.0
    if a.cold_streams:  # steady: N long streams that run through the probes, no arrivals in their windows
        models = list(w.adapters) or [w.base]
        rng = random.Random(w.seed)
        background = [Planned(0.05 * i, models[i % len(models)], f"Stream {i}: {_words(w, rng)}", a.cold_stream_tokens)
                      for i in range(a.cold_streams)]
    else:  # Poisson arrivals at ``rate``, as in a sweep
        background = plan(replace(w, duration=max(w.duration or 0.0, span), requests=None), rate)
    t0 = time.perf_counter()
    bg = asyncio.create_task(run_planned(client, background, a.ignore_eos, a.timeout, t0))
    mt = w.max_tokens.sample(random.Random(w.seed))
    tasks = []
    for i, (name, state) in enumerate(probes):  # on schedule, whether or not the previous probe finished
        await asyncio.sleep(max(0.0, t0 + window * (i + 1) - time.perf_counter()))
        tasks.append(asyncio.create_task(_one(client, Planned(window * (i + 1), name, "Request cold: " + " ".join(WORDS[:20]),
                                                              mt), t0, a.ignore_eos, a.timeout)))
    done = [(name, state, r) for (name, state), r in zip(probes, await asyncio.gather(*tasks))]
    results = await bg
    await client.close()
    out = []
    for name, state, r in done:
        end = r.sent + (r.ttft if r.ttft is not None else r.e2e)
        before = percentile(window_gaps(results, r.sent - window, r.sent), 50)
        during = percentile(window_gaps(results, r.sent, end), 50)
        rise = during / before - 1.0 if before and during is not None else None
        out.append({"adapter": name, "state": state, "ok": r.ok, "error": r.error, "ttft_ms": _ms(r.ttft),
                    "e2e_ms": _ms(r.e2e), "window_s": window, "bg_itl_p50_before_ms": _ms(before),
                    "bg_itl_p50_during_ms": _ms(during), "bg_itl_rise": None if rise is None else round(rise, 4)})
    cold = [p for p in out if p["state"] == "cold"]
    ttfts = [p["ttft_ms"] for p in cold if p["ttft_ms"] is not None]
    med = lambda ps: percentile([p["bg_itl_rise"] for p in ps], 50)  # noqa: E731
    return {"probes": out, "cold_ttft_p50_ms": percentile(ttfts, 50), "cold_ttft_max_ms": max(ttfts, default=None),
            "cold_ttft_le_1s": bool(ttfts) and len(ttfts) == len(cold) and max(ttfts) <= 1000.0,
            "bg_itl_rise_p50_cold": med(cold), "bg_itl_rise_p50_warm": med([p for p in out if p["state"] == "warm"]),
            "background": summarize(results, rate, time.perf_counter() - t0)}


# ---- report and plot -------------------------------------------------------------------------------------
HEADER = (f"{'offered':>8} {'achieved':>8} {'tok/s':>8} {'ttft50':>8} {'ttft99':>8} {'itl50':>7} {'itl99':>7} "
          f"{'tpot50':>7} {'e2e50':>8} {'e2e99':>8}  errors   (req/s; latencies in ms)")


def _row(s: dict) -> str:
    f = lambda v, n: f"{'-' if v is None else f'{v:.1f}':>{n}}"  # noqa: E731
    errs = ",".join(f"{k}={v}" for k, v in s["errors"].items()) or "0"
    return (f"{s['offered_rate']:>8.2f} {s['achieved_rps']:>8.2f} {s['output_tok_s']:>8.1f} {f(s['ttft_p50_ms'], 8)} "
            f"{f(s['ttft_p99_ms'], 8)} {f(s['itl_p50_ms'], 7)} {f(s['itl_p99_ms'], 7)} {f(s['tpot_p50_ms'], 7)} "
            f"{f(s['e2e_p50_ms'], 8)} {f(s['e2e_p99_ms'], 8)}  {errs}")


def plot(reports: list[dict], path: str) -> None:
    """Latency versus offered load: TTFT p50, TTFT p99 and TPOT p50 side by side, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("ttft_p50_ms", "TTFT p50"), ("ttft_p99_ms", "TTFT p99"), ("tpot_p50_ms", "TPOT p50")]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], keys):
        for rep in reports:
            pts = sorted((s["offered_rate"], s[key]) for s in rep.get("results", []) if s.get(key) is not None)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=rep.get("label") or "?")
        ax.set(title=title, xlabel="offered load (req/s)", ylabel="ms")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraplex bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="the server, e.g. http://127.0.0.1:8000 (/v1 is added when missing)")
    p.add_argument("--api-key", default="unused")
    p.add_argument("--label", help="name of this system in the JSON and plots (default: the URL)")
    p.add_argument("--adapters", default="", help="model names to spread the load over, comma-separated")
    p.add_argument("--base", help="the base model's name, to send a share of base-model requests")
    p.add_argument("--base-share", type=float, default=0.1, help="share of requests to --base (default 0.1)")
    p.add_argument("--popularity", choices=["uniform", "zipf"], default="uniform")
    p.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent, by rank in --adapters")
    rates = p.add_mutually_exclusive_group()
    rates.add_argument("--rate", type=float, help="offered load, requests per second (Poisson)")
    rates.add_argument("--rates", type=parse_rates, help="a sweep of offered loads, e.g. 1,2,4,8")
    p.add_argument("--duration", type=float, default=None, help="seconds of arrivals per rate (default 10)")
    p.add_argument("--requests", type=int, help="requests per rate (instead of, or bounding, --duration)")
    p.add_argument("--prompt-words", type=parse_dist, default=Dist(20, 20), help="fixed:N or uniform:LO:HI")
    p.add_argument("--max-tokens", type=parse_dist, default=Dist(64, 64), help="fixed:N or uniform:LO:HI")
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (vLLM and loraplex accept it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds one request may take in all")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip one warm-up request per model")
    p.add_argument("--json", dest="json_out", nargs="?", const="-", help="the results as JSON: to stdout, or to FILE")
    p.add_argument("--plot", help="a PNG of latency versus offered load")
    p.add_argument("--compare", nargs="+", metavar="JSON", help="plot these result files side by side (no load)")
    p.add_argument("--cold-adapter", help="probe: first token of these cold adapters (comma-separated, one per "
                                          "window) under background load")
    p.add_argument("--cold-warm", action="store_true",
                   help="probe each cold adapter again a window later, resident by then: the control")
    p.add_argument("--cold-window", type=float, default=5.0, help="seconds of background before the probe (5)")
    p.add_argument("--cold-streams", type=int, default=0,
                   help="probe background: N steady streams (started together, running through the probe) "
                        "instead of Poisson arrivals at --rate, so no other request arrives in the probe's window")
    p.add_argument("--cold-stream-tokens", type=int, default=256, help="max_tokens of each steady stream (256)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    if a.compare:
        if not a.plot:
            p.error("--compare needs --plot FILE.png")
        plot([json.loads(open(f).read()) for f in a.compare], a.plot)
        print(f"wrote {a.plot}")
        return 0
    adapters = [x.strip() for x in a.adapters.split(",") if x.strip()]
    rates = a.rates or [a.rate if a.rate is not None else 1.0]
    for bad, msg in [(not a.url, "--url is required (or --compare)"), (not adapters and not a.base, "give --adapters and/or --base"),
                     (min(a.requests or 1, 1 if a.duration is None else a.duration, a.timeout) <= 0,
                      "--requests, --duration and --timeout must be positive"),
                     (not 0.0 <= a.base_share <= 1.0, "--base-share must be within [0, 1]"),
                     (not all(0 < r < math.inf for r in rates), "--rate must be positive"),
                     (bool(set((a.cold_adapter or "").split(",")) & set(adapters)),
                      "--cold-adapter must not be one of the background --adapters"),
                     (a.cold_streams < 0 or a.cold_stream_tokens < 1, "--cold-streams and --cold-stream-tokens must be positive")]:
        if bad:
            p.error(msg)
    duration = a.duration if a.duration is not None or a.requests else 10.0
    w = Workload(adapters, a.base, a.base_share if adapters else 1.0, a.popularity, a.zipf_s, a.prompt_words,
                 a.max_tokens, duration, a.requests, a.seed)
    report = {"label": a.label or a.url, "url": a.url, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "workload": {**asdict(w), "prompt_words": [w.prompt_words.lo, w.prompt_words.hi],
                           "max_tokens": [w.max_tokens.lo, w.max_tokens.hi], "ignore_eos": a.ignore_eos}}
    if a.cold_adapter:
        report["cold"] = asyncio.run(cold_probe(a, w, rates[0]))
        report["results"] = [report["cold"]["background"]]
    else:
        print(HEADER, file=sys.stderr if a.json_out == "-" else sys.stdout, flush=True)
        report["results"] = asyncio.run(sweep(a, w, rates))
    if a.plot:
        plot([report], a.plot)
    if a.json_out and a.json_out != "-":
        with open(a.json_out, "w") as f:
            json.dump(report, f, indent=2)
    if a.json_out == "-":
        print(json.dumps(report, indent=2))
    elif "cold" in report:
        print(HEADER + "\n" + _row(report["results"][0]) + "\n" + json.dumps(
            {k: v for k, v in report["cold"].items() if k != "background"}, indent=2))
    return 0
