"""The trainer end to end on the real default base: QLoRA (NF4) on SmolLM2-135M-Instruct with the shipped triage
dataset, published as a version, then served by the native engine from the registry.

Stated margin: eval loss falls to at most a quarter of its value before training; every held-out answer of
the served adapter has the trained format ``TRIAGE[category|priority]`` and none of the base model's does, and at
least a quarter match the reference exactly (the base: none). 30 steps teach the format; the labels take longer
(the full example schedule, 162 steps, is in the README).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "train.yaml"
HELDOUT = ROOT / "examples" / "triage" / "heldout.jsonl"
FORMAT = re.compile(r"TRIAGE\[(billing|shipping|account|technical)\|(high|low)\]")
STEPS = 30  # the example config's schedule, cut to what CI can afford (see benchmarks/train.py for time-to-behaviour)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(smol_bf16, smol_cache, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("triage")
    home = root / "home"
    (home / ".loraplex" / "models").mkdir(parents=True)
    # The embedded base, converted once per test session, where `loraplex` looks for it under this HOME.
    (home / ".loraplex" / "models" / "smollm2-135m-instruct").symlink_to(smol_cache / "smollm2-135m-instruct")
    registry = (root / "registry").as_uri()
    env = {**os.environ, "HOME": str(home), "LORAPLEX_HOME": str(home / ".loraplex"), "LORAPLEX_PROGRESS": "0"}
    p = subprocess.run([sys.executable, "-m", "loraplex", "train", str(EXAMPLE), f"output_dir={root / 'run'}",
                        f"train.max_steps={STEPS}", "train.save_steps=1000", "--push", "triage", "--alias", "candidate",
                        "--registry", registry, "--json"], env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    return {"out": out, "record": json.loads(Path(out["record"]).read_text()), "registry": registry, "env": env,
            "home": home}


def heldout() -> tuple[list[list[dict]], list[str]]:
    rows = [json.loads(line) for line in HELDOUT.read_text().splitlines() if line.strip()]
    return [r["messages"][:-1] for r in rows], [r["messages"][-1]["content"] for r in rows]


def test_training_lowers_eval_loss_by_the_stated_margin(trained):
    rec = trained["record"]
    assert trained["out"]["pushed"] == "triage@1"
    assert rec["steps"] == STEPS and rec["base_model"] == "smollm2-135m-instruct"
    assert rec["config"]["quantize"] == "nf4"
    assert rec["final_eval_loss"] <= 0.25 * rec["initial_eval_loss"], (rec["initial_eval_loss"], rec["final_eval_loss"])


def test_the_native_engine_serves_the_learned_behaviour(trained, smol_cache):
    from loraplex.adapters import AdapterCache, AdapterRegistry
    from loraplex.server.engine.engine import EngineConfig, build_engine
    from loraplex.server.engine.request import SamplingParams
    from loraplex.server.model.loader import ModelSpec

    registry = AdapterRegistry(trained["registry"], cache=AdapterCache(trained["home"] / "cache"))
    engine, loaded = build_engine(ModelSpec(quantize="nf4", cache_dir=smol_cache),
                                  EngineConfig(max_loras=2, max_lora_rank=16, max_running=32), registry)
    convs, refs = heldout()
    prompts = [loaded.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    greedy = SamplingParams(max_tokens=16, temperature=0)
    n = len(prompts)
    # Adapter and base requests share the batch, as they do in the server.
    seqs = engine.generate(prompts * 2, greedy, adapters=["triage@candidate"] * n + [None] * n)
    tuned, base = [s.text.strip() for s in seqs[:n]], [s.text.strip() for s in seqs[n:]]
    assert all(FORMAT.fullmatch(a) for a in tuned), tuned
    assert not any(FORMAT.search(a) for a in base), base
    exact = sum(a == r for a, r in zip(tuned, refs))
    assert exact >= n // 4, (exact, tuned, refs)  # the format is learned first; the labels need more steps


def test_eval_prints_both_versions_side_by_side(trained):
    p = subprocess.run([sys.executable, "-m", "loraplex", "eval", "triage@candidate", "--data", str(HELDOUT),
                        "--against", "base", "--registry", trained["registry"], "--json"], env=trained["env"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    tuned, base = json.loads(p.stdout)
    assert tuned["resolved"] == "triage@1" and base["resolved"] == "base" and tuned["rows"] == 16
    assert tuned["eval_loss"] < base["eval_loss"] / 4
    assert tuned["exact_match"] >= 0.25 and base["exact_match"] == 0.0
    # The table the command prints without --json, from the same results (no second model load)
    from loraplex.trainer.commands import table
    from loraplex.trainer.evaluation import EvalResult

    text = table([EvalResult(**r) for r in (tuned, base)])
    assert "triage@1" in text and "base" in text and "exact match" in text and "eval loss" in text
    assert [line.split() for line in text.splitlines() if line.startswith("rows")] == [["rows", "16", "16"]], text
