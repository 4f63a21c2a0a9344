"""``loraplex train`` on a tiny Llama built in-process: the CLI's failure contract, publishing to both registry
backends with the training record, and ``--resume`` after a SIGKILL giving the same adapter as an
uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from server_fixtures import save_tiny_base
from cli_checks import one_line_error

pytestmark = pytest.mark.slow  # real training runs (SmolLM2-shaped tiny models, subprocesses)

def env(**extra) -> dict:
    """The environment at call time (the S3 fixture sets its credentials with monkeypatch), without progress bars."""
    return {**os.environ, "LORAPLEX_PROGRESS": "0", **extra}


def _rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable toy task in the tiny tokenizer's words: the answer is the first word of the question, twice."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [f"w{rng.randrange(10, 100)}" for _ in range(rng.randrange(2, 6))]
        out.append({"messages": [{"role": "user", "content": " ".join(words)},
                                 {"role": "assistant", "content": f"{words[0]} {words[0]}"}]})
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("train")
    base = save_tiny_base(root / "tiny-base")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(64)))
    return {"root": root, "base": base, "data": data}


def _config(tiny, folder: Path, **train) -> Path:
    cfg = {"model": str(tiny["base"]), "quantize": "none", "output_dir": str(folder / "out"),
           "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]},
           "data": {"train": [str(tiny["data"])], "eval_fraction": 0.125},
           "train": {"max_steps": 12, "batch_size": 4, "save_steps": 4, "learning_rate": 0.01, "threads": 1, **train}}
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "train.yaml"
    p.write_text(json.dumps(cfg))  # JSON is YAML
    return p


def loraplex(*args, timeout=300, environ=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraplex", *map(str, args)], env=environ or env(),
                          capture_output=True, text=True, timeout=timeout)


def test_train_failures_are_one_line(tiny, tmp_path):
    cfg = _config(tiny, tmp_path / "c")
    one_line_error(loraplex("train", tmp_path / "missing.yaml"), contains="cannot read config")
    one_line_error(loraplex("train", cfg, "train.max_steps=zero"), contains="train.max_steps")
    one_line_error(loraplex("train", cfg, "nokey"), contains="is not key=value")
    one_line_error(loraplex("train", cfg, "--alias", "candidate"), contains="--alias needs --push")
    one_line_error(loraplex("train", cfg, "--push", "../evil"), contains="adapter name")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(tiny["data"].read_text() + '{"messages": [{"role": "user", "content": "w1"}]}\n')
    one_line_error(loraplex("train", cfg, f"data.train=[{bad}]"), contains=f"{bad}:65: the last message")
    pickle = tmp_path / "weights"
    pickle.mkdir()
    (pickle / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (pickle / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    one_line_error(loraplex("train", cfg, f"model={pickle}"), contains="pickle weights only")
    one_line_error(loraplex("train", cfg, "model=gpt2-from-the-hub"), contains="neither an embedded model id nor a folder")
    # An unreachable S3 registry fails before any training starts, not after.
    t = time.monotonic()
    p = loraplex("train", cfg, "--push", "x", "--registry", "s3://b/r?endpoint_url=http://127.0.0.1:9",
                 environ=env(AWS_ACCESS_KEY_ID="a", AWS_SECRET_ACCESS_KEY="b", AWS_MAX_ATTEMPTS="1"))
    one_line_error(p)
    assert not (tmp_path / "c" / "out").exists() and time.monotonic() - t < 60
    one_line_error(loraplex("eval", "../x", "--data", tiny["data"]), contains="adapter name")
    one_line_error(loraplex("eval", "x@1", "--data", tmp_path / "nope.jsonl"), contains="no such file")


def test_train_and_publish_with_the_record(tiny, tmp_path, registry_uri):
    cfg = _config(tiny, tmp_path / "run")
    p = loraplex("train", cfg, "--push", "toy", "--alias", "candidate", "--registry", registry_uri, "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["pushed"] == "toy@1" and out["steps"] == 12
    record = json.loads(Path(out["record"]).read_text())
    assert record["data"]["files"][0]["rows"] == 64 and record["data"]["train_rows"] == 56
    assert record["data"]["eval_rows"] == 8 and len(record["data"]["files"][0]["sha256"]) == 64
    assert [e["step"] for e in record["eval_loss"]] == [0, 12]
    assert record["eval_loss"][-1]["loss"] < record["eval_loss"][0]["loss"]
    assert record["versions"]["peft"] and record["versions"]["trl"] and record["versions"]["torch"]
    assert record["config"]["lora"]["r"] == 4 and record["steps"] == 12

    show = json.loads(loraplex("show", "toy@candidate", "--registry", registry_uri, "--json").stdout)
    assert show["version"] == 1 and show["rank"] == 4 and show["training"]["data"] == record["data"]
    assert show["training"]["final_eval_loss"] == record["final_eval_loss"]
    assert sorted(show["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    # The same adapter again: the registry recognizes it and stores nothing new.
    p = loraplex("train", cfg, "--push", "toy", "--registry", registry_uri)
    assert p.returncode == 0 and "identical to an existing version" in p.stdout


def test_resume_after_kill_matches_an_uninterrupted_run(tiny, tmp_path):
    steps = 160  # the kill comes within 10 ms of checkpoint-40: 120 steps of slack
    straight = _config(tiny, tmp_path / "straight", max_steps=steps, save_steps=20)
    assert loraplex("train", straight).returncode == 0

    cut = _config(tiny, tmp_path / "cut", max_steps=steps, save_steps=20)
    proc = subprocess.Popen([sys.executable, "-m", "loraplex", "train", str(cut)], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "cut" / "out" / "checkpoints"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (ckpts / "checkpoint-40").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (ckpts / "checkpoint-40").exists(), "training ended before the kill"
    assert not (tmp_path / "cut" / "out" / "adapter").exists()

    one_line_error(loraplex("train", _config(tiny, tmp_path / "fresh"), "--resume"), contains="nothing to resume")
    p = loraplex("train", cut, "--resume", "--json")
    assert p.returncode == 0, p.stderr
    record = json.loads((tmp_path / "cut" / "out" / "training.json").read_text())
    assert record["resumed"] and record["steps"] == steps
    assert record["train_loss"][0]["step"] == 1  # the curve from before the kill is kept
    a = load_file(tmp_path / "straight" / "out" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "out" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-4, k


def test_an_eval_between_steps_leaves_nf4_gradients_intact(tiny):
    """bitsandbytes repacks NF4 weights for CPU inference on the first no-grad eval forward, and the repacked
    path has no autograd: the gradient would stop at every base layer. The recipe switches that off; an eval
    in between must leave the next step's gradients exactly as they were."""
    import torch
    from peft import LoraConfig, get_peft_model

    from loraplex.server.model.loader import ModelSpec, load_model
    from loraplex.trainer.recipe import keep_trainable_4bit_path

    model = load_model(ModelSpec(model=str(tiny["base"]), quantize="nf4", dtype="float32")).model
    assert keep_trainable_4bit_path(model) == 2 * 7  # every Linear4bit of the two layers
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "up_proj"]))
    ids = torch.randint(3, 128, (2, 12))

    def grads() -> dict:
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = grads()
    assert before.keys() == after.keys() and len(before) == 8
    for n in before:
        assert torch.equal(before[n], after[n]), n
