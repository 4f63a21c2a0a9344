"""Registry figures: push and pull of a 19 MB adapter to a folder and to a local SeaweedFS, and the
start time of ``loraplex ls``. Medians of N runs measured in one process tree.

    python benchmarks/registry.py [--runs 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from adapter_factory import write_adapter  # noqa: E402
from seaweed import SeaweedServer  # noqa: E402

from loraplex.adapters import AdapterCache, AdapterRegistry  # noqa: E402
from loraplex.adapters.basemodel import SMOLLM2_135M  # noqa: E402

CFG = {k: getattr(SMOLLM2_135M, k) for k in (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")}


def _median_time(fn, runs: int) -> float:
    times = []
    for i in range(runs):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_backend(uri: str, folder: Path, work: Path, runs: int) -> dict:
    reg = AdapterRegistry(uri)
    push = _median_time(lambda i: reg.push(folder, "bench", force=True), runs)
    versions = reg.version_numbers("bench")

    def pull(i: int) -> None:  # a cold cache each time: the bytes really cross the backend
        r = AdapterRegistry(uri, cache=AdapterCache(work / f"cache-{uri[:2]}-{i}"))
        r.pull(f"bench@{versions[i % len(versions)]}", work / f"out-{uri[:2]}-{i}")

    return {"push_s": push, "pull_s": _median_time(pull, runs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
    folder = write_adapter(work / "adapter", cfg=CFG, r=16, base="smollm2-135m-instruct")
    size_mb = (folder / "adapter_model.safetensors").stat().st_size / 1e6
    results = {"adapter_mb": round(size_mb, 1), "runs": args.runs}
    results["folder"] = bench_backend((work / "registry").as_uri(), folder, work, args.runs)
    server = SeaweedServer().start()
    try:
        os.environ.update(server.env())
        server.make_bucket("bench")
        results["seaweedfs"] = bench_backend(f"s3://bench/r?endpoint_url={server.endpoint}", folder, work, args.runs)
    finally:
        server.stop()
    env = dict(os.environ, LORAPLEX_HOME=str(work / "home"))
    ls = [str(Path(sys.executable).parent / "loraplex"),
          "ls", "--registry", (work / "registry").as_uri()]
    results["ls_start_s"] = _median_time(lambda i: subprocess.run(ls, env=env, check=True, capture_output=True), args.runs)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"adapter: {size_mb:.1f} MB (SmolLM2-135M, r=16, 7 projections, fp32); medians of {args.runs} runs")
    for backend in ("folder", "seaweedfs"):
        r = results[backend]
        print(f"{backend:<10} push {r['push_s']:.3f} s   pull (cold cache) {r['pull_s']:.3f} s")
    print(f"loraplex ls start: {results['ls_start_s'] * 1000:.0f} ms")


if __name__ == "__main__":
    main()
