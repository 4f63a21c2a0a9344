"""One request at a time: ms per generated token and time to the first token, per base format (issue 16).

    python benchmarks/single_stream.py FIXTURE [--formats nf4:packed:bfloat16,nf4:dense:float32,...] [--runs 3]

FIXTURE is ../shared/peers' (``python ../shared/peers/make_fixture.py FIXTURE``: SmolLM2-135M and 4 adapters,
r=16 on all seven projections). Each format runs in its own subprocess, one after the other in this one
invocation: the native engine (the server's, without HTTP), greedy, EOS ignored; a 20-token prompt then 128
new tokens (ms/token: the decode steps' median over ``--runs`` runs), base and with one adapter; and the time to
the first token of a 1,000-token prompt. Results go to benchmarks/results/single-stream.json, keyed by format,
with the CPU's name and flags.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results"
DEFAULT_FORMATS = "nf4:packed:bfloat16,nf4:dense:float32,none:dense:float32,none:dense:bfloat16"


def run_one(fixture: Path, fmt: str, runs: int) -> dict:
    """Inside the subprocess: one format, every measurement."""
    import torch

    from loraplex.server.engine.engine import Engine, EngineConfig
    from loraplex.server.engine.sampling import SamplingParams
    from loraplex.server.lora.weights import LoraWeights
    from loraplex.server.model.loader import ModelSpec, load_model

    quantize, weights, dtype = fmt.split(":")
    t = time.perf_counter()
    loaded = load_model(ModelSpec(model=str(fixture / "smollm2"), quantize=quantize, weights=weights, dtype=dtype))
    adapter = sorted(p for p in (fixture / "adapters").iterdir() if (p / "adapter_config.json").exists())[0]
    engine = Engine(loaded.model, loaded.config, loaded.tokenizer, dtype=getattr(torch, dtype), owns_model=True,
                    engine_config=EngineConfig(max_loras=1, max_lora_rank=16, max_running=1, max_model_len=2048,
                                               max_batched_tokens=1024, prefill_chunk=1024,
                                               prefix_caching=False),  # every prompt computed, each run
                    loader=lambda n: LoraWeights.load(adapter, n))
    load_s = time.perf_counter() - t
    gen = torch.Generator().manual_seed(0)
    short = [int(x) for x in torch.randint(100, 20000, (20,), generator=gen)]
    long = [int(x) for x in torch.randint(100, 20000, (1000,), generator=gen)]

    def decode(adapters) -> tuple[float, float]:
        """(ms per decoded token, TTFT ms) of a 20-token prompt and 128 new tokens."""
        sp = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
        rid = engine.add_request(short, sp, adapters=adapters)
        t0 = time.perf_counter()
        first, steps = None, []
        while engine.has_work():
            ts = time.perf_counter()
            engine.step()
            if first is None:
                first = time.perf_counter() - t0
            else:
                steps.append(time.perf_counter() - ts)
        del rid
        return 1e3 * statistics.median(steps), 1e3 * first

    def ttft(prompt) -> float:
        sp = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        t0 = time.perf_counter()
        engine.generate([prompt], sp)
        return 1e3 * (time.perf_counter() - t0)

    out: dict = {"load_s": load_s}
    decode(None)  # warm-up
    decode("a")  # warm-up (and the adapter's load)
    for label, adapters in (("base", None), ("adapter", "a")):
        got = [decode(adapters) for _ in range(runs)]
        out[f"{label}_ms_per_token"] = statistics.median(g[0] for g in got)
        out[f"{label}_ttft20_ms"] = statistics.median(g[1] for g in got)
    ttft(long)  # warm-up
    out["base_ttft1000_ms"] = statistics.median(ttft(long) for _ in range(runs))
    out["resident_bytes"] = loaded.resident_bytes() + engine.decoder.packed_nbytes
    return out


def cpu() -> dict:
    from loraplex.server.hardware import Hardware

    hw = Hardware.detect()
    return {"cpu": hw.cpu, "kind": hw.kind}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("fixture", type=Path)
    ap.add_argument("--formats", default=DEFAULT_FORMATS, help="comma-separated quantize:weights:dtype")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.fixture.absolute(), args.one, args.runs)))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    out_file = OUT / "single-stream.json"
    report = {"machine": cpu(), "date": time.strftime("%Y-%m-%d %H:%M"), "runs": {}}
    for fmt in args.formats.split(","):
        p = subprocess.run([sys.executable, __file__, str(args.fixture), "--one", fmt, "--runs", str(args.runs)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            print(fmt, "failed:", p.stderr[-2000:], flush=True)
            continue
        report["runs"][fmt] = json.loads(p.stdout.strip().splitlines()[-1])
        print(fmt, json.dumps({k: round(v, 2) for k, v in report["runs"][fmt].items()}), flush=True)
        out_file.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
