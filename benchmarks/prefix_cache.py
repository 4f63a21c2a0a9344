"""Prefix caching and the paged KV cache, measured on the native engine (in-process, no HTTP).

Shared system prompts: ``--adapters`` adapters (the peers' fixture), each with its own system prompt of
``--system-tokens`` tokens, ``--requests`` requests with a short question each (round-robin over the adapters),
Poisson arrivals at ``--rate`` per second. Reports TTFT p50/p99 (arrival to first token) and throughput with
prefix caching on and off, each in its own process, one after the other in this one invocation.

Multi-turn: ``--conversations`` chats of ``--turns`` turns each, every turn's prompt the whole conversation so
far plus ``--turn-tokens`` new tokens: TTFT per turn with caching on and off.

Memory: the KV bytes the pool holds for ``--mem-running`` running requests of ``--mem-tokens`` tokens at
``max_model_len`` 8192, against the bytes those tokens need (one slot of max_model_len per sequence would
reserve max_model_len / tokens times more).

usage: python benchmarks/prefix_cache.py FIXTURE [--rate 0.5] [--requests 32] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _engine(fixture: Path, caching: bool, max_model_len: int = 4096, max_running: int = 32):
    from loraplex.server.engine.engine import Engine, EngineConfig
    from loraplex.server.lora.weights import LoraWeights
    from loraplex.server.model.loader import ModelSpec, load_model

    loaded = load_model(ModelSpec(model=str(fixture / "smollm2"), quantize="none", dtype="float32"))
    folders = {p.name: p for p in sorted((fixture / "adapters").iterdir())}
    cfg = EngineConfig(max_loras=len(folders), max_lora_rank=16, max_running=max_running, max_model_len=max_model_len,
                       max_batched_tokens=1024, prefill_chunk=512, prefix_caching=caching)
    engine = Engine(loaded.model, loaded.config, loaded.tokenizer, engine_config=cfg,
                    loader=lambda n: LoraWeights.load(folders[n], n), owns_model=True)
    return engine, sorted(folders)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def shared_prompts(fixture: Path, caching: bool, rate: float, requests: int, system_tokens: int, seed: int) -> dict:
    from loraplex.server.engine.sampling import SamplingParams

    engine, adapters = _engine(fixture, caching)
    rng = random.Random(seed)
    vocab = engine.vocab_size
    systems = {a: [rng.randrange(100, vocab - 100) for _ in range(system_tokens)] for a in adapters}
    for a in adapters:  # adapters loaded before the clock starts (their loads are not what is measured)
        engine.generate([[1, 2, 3]], SamplingParams(max_tokens=1), [a])
    engine.pool.queries = engine.pool.hits = 0
    arrivals, t = [], 0.0
    for i in range(requests):
        t += rng.expovariate(rate)
        a = adapters[i % len(adapters)]
        question = [rng.randrange(100, vocab - 100) for _ in range(rng.randint(12, 24))]
        arrivals.append((t, a, systems[a] + question))
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    first: dict[str, float] = {}
    start_of: dict[str, float] = {}
    tokens = 0
    t0 = time.perf_counter()
    pending = list(arrivals)
    while pending or engine.has_work():
        now = time.perf_counter() - t0
        while pending and pending[0][0] <= now:
            at, a, prompt = pending.pop(0)
            rid = engine.add_request(prompt, params, adapters=a)
            start_of[rid] = at
        if not engine.has_work():
            time.sleep(max(0.0, min(0.05, pending[0][0] - now)) if pending else 0)
            continue
        for out in engine.step():
            if out.error is not None:
                raise out.error
            tokens += len(out.new_token_ids)
            if out.request_id not in first and out.new_token_ids:
                first[out.request_id] = time.perf_counter() - t0
    wall = time.perf_counter() - t0
    ttft = [first[r] - start_of[r] for r in start_of]
    return {"caching": caching, "ttft_p50": statistics.median(ttft), "ttft_p99": _pct(ttft, 0.99),
            "tok_per_s": tokens / wall, "wall_s": wall, "prefix_hit_share": engine.pool.hits / max(1, engine.pool.queries),
            "leaked_blocks": engine.pool.used_blocks}


def multi_turn(fixture: Path, caching: bool, conversations: int, turns: int, turn_tokens: int, seed: int) -> dict:
    """``conversations`` chats of ``turns`` turns, run together turn by turn: each turn's prompt is the whole
    conversation so far (earlier prompts and answers) plus ``turn_tokens`` new tokens; TTFT per turn (median
    over the conversations)."""
    from loraplex.server.engine.sampling import SamplingParams

    engine, adapters = _engine(fixture, caching)
    rng = random.Random(seed)
    vocab = engine.vocab_size
    for a in adapters:
        engine.generate([[1, 2, 3]], SamplingParams(max_tokens=1), [a])
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    history = [[] for _ in range(conversations)]
    per_turn = []
    for _ in range(turns):
        t0 = time.perf_counter()
        ids = {}
        for c in range(conversations):
            history[c] += [rng.randrange(100, vocab - 100) for _ in range(turn_tokens)]
            ids[engine.add_request(history[c], params, adapters=adapters[c % len(adapters)])] = c
        first, outs = {}, {}
        while engine.has_work():
            for out in engine.step():
                if out.new_token_ids and out.request_id not in first:
                    first[out.request_id] = time.perf_counter() - t0
                outs.setdefault(out.request_id, []).extend(out.new_token_ids)
        for rid, c in ids.items():
            history[c] += outs[rid]
        per_turn.append({"context": statistics.mean(len(h) for h in history), "ttft_p50": statistics.median(first.values())})
    return {"caching": caching, "turns": per_turn, "leaked_blocks": engine.pool.used_blocks}


def memory(fixture: Path, running: int, tokens: int) -> dict:
    from loraplex.server.engine.sampling import SamplingParams

    engine, _ = _engine(fixture, caching=False, max_model_len=8192, max_running=running)
    rng = random.Random(1)
    prompt_len = tokens - 8
    for _ in range(running):
        engine.add_request([rng.randrange(100, 40000) for _ in range(prompt_len)],
                           SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    held = 0
    while engine.has_work():
        engine.step()
        if len(engine.scheduler.running) == running:
            held = max(held, engine.pool.used_blocks)
    need = running * tokens * 2 * len(engine.decoder.layers) * engine.decoder.num_kv_heads * engine.decoder.head_dim * 4
    return {"running": running, "tokens": tokens, "held_bytes": held * engine.cache.block_nbytes, "needed_bytes": need,
            "ratio": held * engine.cache.block_nbytes / need, "slots_would_reserve": 8192 / tokens}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fixture", type=Path)
    ap.add_argument("--rate", type=float, default=0.5)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--system-tokens", type=int, default=1500)
    ap.add_argument("--mem-running", type=int, default=32)
    ap.add_argument("--mem-tokens", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--turn-tokens", type=int, default=200)
    ap.add_argument("--one", choices=["on", "off", "memory", "chat-on", "chat-off"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        if a.one == "memory":
            out = memory(a.fixture, a.mem_running, a.mem_tokens)
        elif a.one.startswith("chat-"):
            out = multi_turn(a.fixture, a.one == "chat-on", a.conversations, a.turns, a.turn_tokens, a.seed)
        else:
            out = shared_prompts(a.fixture, a.one == "on", a.rate, a.requests, a.system_tokens, a.seed)
        print(json.dumps(out))
        return 0
    results = {}
    for part in ("off", "on", "chat-off", "chat-on", "memory"):  # each in its own process
        cmd = [sys.executable, __file__, str(a.fixture), "--one", part, "--rate", str(a.rate), "--requests",
               str(a.requests), "--system-tokens", str(a.system_tokens), "--mem-running", str(a.mem_running),
               "--mem-tokens", str(a.mem_tokens), "--seed", str(a.seed), "--conversations", str(a.conversations),
               "--turns", str(a.turns), "--turn-tokens", str(a.turn_tokens)]
        results[part] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    if a.json:
        print(json.dumps(results, indent=1))
        return 0
    off, on, mem = results["off"], results["on"], results["memory"]
    print(f"shared system prompts ({a.system_tokens} tokens x {a.requests} requests, Poisson {a.rate}/s):")
    for r in (off, on):
        print(f"  caching {'on ' if r['caching'] else 'off'}: TTFT p50 {r['ttft_p50']:.2f} s, p99 {r['ttft_p99']:.2f} s, "
              f"{r['tok_per_s']:.1f} tok/s, prefix hits {r['prefix_hit_share']:.0%}")
    print(f"  TTFT p50 on/off: {on['ttft_p50'] / off['ttft_p50']:.3f}x; throughput on/off: "
          f"{on['tok_per_s'] / off['tok_per_s']:.2f}x")
    chat_off, chat_on = results["chat-off"]["turns"], results["chat-on"]["turns"]
    print(f"multi-turn ({a.conversations} conversations x {a.turns} turns of {a.turn_tokens} new tokens + 32 answer "
          "tokens), TTFT p50 per turn, caching off / on:")
    for i, (x, y) in enumerate(zip(chat_off, chat_on)):
        print(f"  turn {i + 1} (context {x['context']:.0f}): {x['ttft_p50']:.2f} s / {y['ttft_p50']:.2f} s")
    print(f"memory: {mem['running']} running x {mem['tokens']} tokens: pool holds {mem['held_bytes'] / 1e6:.1f} MB for "
          f"{mem['needed_bytes'] / 1e6:.1f} MB of KV ({mem['ratio']:.2f}x; one slot of 8192 per sequence: "
          f"{mem['slots_would_reserve']:.0f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
