"""Training speed, side by side: loraplex train vs plain PEFT + TRL SFTTrainer QLoRA (the peer).

Both train SmolLM2-135M-Instruct in NF4 on the shipped triage dataset (examples/triage), r=16 on all
linear layers, batch 8, on this machine, each in its own process (so peak RSS is each one's own). Every
``--probe-every`` steps the clock stops and the model answers the 16 held-out prompts greedily; the run
ends at the first probe where every answer has the trained format (time-to-behaviour), or at
``--max-steps``. Reported per system: time-to-behaviour (train time only, probes excluded, model load
excluded), steps, steps/s, peak RSS, and the probe history (format and exact-match counts).

The peer is configured as a user following TRL's QLoRA docs would: conversational rows, SFTTrainer's
defaults (loss on the whole sequence, max_length 128), bf16 compute, lr 2e-4, LoRA alpha 32, dropout 0.05.

    python benchmarks/train.py                 # both, results in benchmarks/results/train.json
    python benchmarks/train.py --only loraplex
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "triage"
FORMAT = re.compile(r"TRIAGE\[(billing|shipping|account|technical)\|(high|low)\]")


def heldout() -> list[dict]:
    return [json.loads(line) for line in (DATA / "heldout.jsonl").read_text().splitlines() if line.strip()]


def probe_callback(tokenizer, every: int, log: list, stop_when_learned: bool = True):
    """A TrainerCallback that pauses the clock, answers the held-out prompts greedily and stops training once
    every answer has the trained format."""
    import torch
    from transformers import TrainerCallback

    from loraplex.trainer.recipe import keep_trainable_4bit_path

    rows = heldout()
    prompts = [tokenizer.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True) for r in rows]
    refs = [r["messages"][-1]["content"] for r in rows]

    class Probe(TrainerCallback):
        def __init__(self):
            self.train_seconds = 0.0
            self.t = None

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % every:
                return
            self.train_seconds += time.perf_counter() - self.t
            was_training = model.training
            keep_trainable_4bit_path(model)  # generating in eval mode must not repack the NF4 weights (see there)
            model.eval()
            side = tokenizer.padding_side
            tokenizer.padding_side = "left"
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            tokenizer.padding_side = side
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            answers = [tokenizer.decode(o[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for o in out]
            fmt = sum(bool(FORMAT.fullmatch(a)) for a in answers)
            exact = sum(a == r for a, r in zip(answers, refs))
            log.append({"step": state.global_step, "train_seconds": round(self.train_seconds, 2), "format": fmt,
                        "exact": exact, "of": len(refs), "sample": answers[0][:60]})
            print(f"  step {state.global_step}: {self.train_seconds:.1f} s, format {fmt}/{len(refs)}, exact {exact}/{len(refs)}"
                  f"  e.g. {answers[0][:40]!r}", file=sys.stderr, flush=True)
            if stop_when_learned and fmt == len(refs):
                control.should_training_stop = True
            if was_training:
                model.train()
            self.t = time.perf_counter()

    return Probe()


def run_peer(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from loraplex.server.model.loader import ModelSpec, convert_embedded

    folder = convert_embedded(ModelSpec().cache_dir)
    tok = AutoTokenizer.from_pretrained(folder)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, dtype=torch.bfloat16)
    rows = [json.loads(line) for line in (DATA / "train.jsonl").read_text().splitlines() if line.strip()]
    log: list = []
    probe = probe_callback(tok, args.probe_every, log)
    cfg = SFTConfig(output_dir=str(args.workdir / "peer"), per_device_train_batch_size=8, learning_rate=2e-4,
                    max_steps=args.max_steps, max_length=128, logging_steps=10, save_strategy="no", report_to="none",
                    use_cpu=True, bf16=False, disable_tqdm=True, seed=0)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                                task_type="CAUSAL_LM"), callbacks=[probe])
    trainer.train()
    return {"log": log, "steps": trainer.state.global_step, "train_seconds": round(probe.train_seconds, 2)}


def run_loraplex(args) -> dict:
    from loraplex.trainer.config import load_config
    from loraplex.trainer.recipe import train

    overrides = [f"output_dir={args.workdir / 'loraplex'}", *args.set]
    if args.fixed_steps:
        overrides.append(f"train.max_steps={args.max_steps}")
    cfg, base = load_config(ROOT / "examples" / "train.yaml", overrides)
    log: list = []
    from transformers import AutoTokenizer

    from loraplex.server.model.loader import ModelSpec, convert_embedded

    tok = AutoTokenizer.from_pretrained(convert_embedded(ModelSpec().cache_dir))
    probe = probe_callback(tok, args.probe_every, log)
    result = train(cfg, base, progress=False, callbacks=[probe])
    return {"log": log, "steps": result.record["steps"], "train_seconds": round(probe.train_seconds, 2),
            "config": result.record["config"]}


def child(system: str, args) -> None:
    import torch

    torch.manual_seed(0)
    t0 = time.perf_counter()
    out = run_peer(args) if system == "peer" else run_loraplex(args)
    out["wall_seconds"] = round(time.perf_counter() - t0, 1)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0)
    learned = next((p for p in out["log"] if p["format"] == p["of"]), None)
    out["time_to_behaviour_s"] = learned["train_seconds"] if learned else None
    out["steps_to_behaviour"] = learned["step"] if learned else None
    probes = out["log"]
    out["steps_per_second"] = round(probes[-1]["step"] / probes[-1]["train_seconds"], 3) if probes else None
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["peer", "loraplex"])
    ap.add_argument("--probe-every", type=int, default=10)
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--fixed-steps", action="store_true", help="loraplex: train.max_steps=--max-steps (default: "
                                                                    "the example config's own schedule)")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value",
                    help="loraplex: overrides of examples/train.yaml (e.g. train.batch_size=4)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/loraplex-train-bench"))
    ap.add_argument("--child", choices=["peer", "loraplex"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train.json")
    args = ap.parse_args()
    if args.child:
        child(args.child, args)
        return
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "workload": "SmolLM2-135M-Instruct NF4, examples/triage (216 train rows after the eval split for "
                           "loraplex, 240 for the peer), r=16 all-linear; peer: batch 8, lr 2e-4, bf16 compute; "
                           "loraplex: examples/train.yaml (batch 4, lr 1e-3 cosine, fp32 compute, answer-only loss)"
                           + (f" with {' '.join(args.set)}" if args.set else "")
                           + f"; 16 held-out prompts probed every {args.probe_every} steps", "systems": {}}
    for system in ([args.only] if args.only else ["loraplex", "peer"]):
        print(f"{system} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--child", system, "--probe-every", str(args.probe_every),
               "--max-steps", str(args.max_steps), "--workdir", str(args.workdir), "--set", *args.set] + (["--fixed-steps"] if args.fixed_steps else [])
        p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)  # the child's progress goes to stderr
        if p.returncode:
            sys.exit(f"{system} failed")
        results["systems"][system] = json.loads(p.stdout.strip().splitlines()[-1])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")  # each system's result kept as soon as it is in
    s = results["systems"]
    if "peer" in s and "loraplex" in s and s["peer"]["time_to_behaviour_s"] and s["loraplex"]["time_to_behaviour_s"]:
        results["time_ratio_loraplex_over_peer"] = round(s["loraplex"]["time_to_behaviour_s"] / s["peer"]["time_to_behaviour_s"], 3)
        results["rss_ratio_loraplex_over_peer"] = round(s["loraplex"]["peak_rss_mb"] / s["peer"]["peak_rss_mb"], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for name, r in s.items():
        print(f"{name:9s} time-to-behaviour {r['time_to_behaviour_s']} s at step {r['steps_to_behaviour']}, "
              f"{r['steps_per_second']} steps/s, peak RSS {r['peak_rss_mb']:.0f} MB")
    if "time_ratio_loraplex_over_peer" in results:
        print(f"loraplex/peer time {results['time_ratio_loraplex_over_peer']}, RSS {results['rss_ratio_loraplex_over_peer']}")


if __name__ == "__main__":
    main()
