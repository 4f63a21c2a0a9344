"""The QLoRA SFT recipe, in one readable function: config in, PEFT adapter folder and training record out.

What comes from where:
- the base model: ``server.model.loader.load_model``, the same resolution and the same bitsandbytes NF4
  quantization (double quant) as ``loraplex serve``, so the adapter is trained on the weights it is served on;
- the LoRA layers, DoRA, rsLoRA and the adapter's on-disk format: PEFT (``LoraConfig``, ``get_peft_model``,
  ``prepare_model_for_kbit_training``, ``save_pretrained``);
- the training loop, optimizer, schedule, gradient accumulation and checkpointing, resumable checkpoints:
  TRL's ``SFTTrainer`` (on transformers' ``Trainer``), fed with already tokenized rows;
- our own: reading and checking the data (so a bad row names its file and line), tokenizing with labels on
  assistant tokens only (derived from the chat template turn by turn, which works for templates without
  generation markers, SmolLM2's included), the progress bar, and the training record.

Speed on CPU comes from choices, not a new loop: matmuls in float32 (bf16 matmuls of these sizes are slower
than fp32 on CPUs without AMX), loss on assistant tokens only, padding to the longest row of a batch, and
a learning rate suited to LoRA on a small model. See benchmarks/train.py for the measured effect.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import TrainConfig, TrainConfigError, resolve
from .data import DataError, DataFile, Example, Row, encode_all, read_files, split

ADAPTER_DIR = "adapter"
RECORD_FILE = "training.json"
CHECKPOINTS_DIR = "checkpoints"
INITIAL_EVAL_FILE = "initial_eval.json"


@dataclass
class TrainResult:
    adapter_dir: Path
    record: dict
    record_path: Path


def _compute_dtype(cfg: TrainConfig) -> str:
    if cfg.train.compute_dtype != "auto":
        return cfg.train.compute_dtype
    return "bfloat16" if cfg.device == "cuda" else "float32"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("loraplex", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _dataset(examples: list[Example]):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]})


def _progress_callback(total_steps: int, enabled: bool):
    from tqdm import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """A tqdm bar (steps, rate) with the latest train and eval loss."""

        bar = None

        def on_train_begin(self, args, state, control, **kw):
            self.bar = tqdm(total=total_steps, initial=state.global_step, desc="train", unit="step", file=sys.stderr,
                            disable=not enabled, dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if self.bar is not None and ("loss" in logs or "eval_loss" in logs):
                post = {k: f"{logs[k]:.4f}" for k in ("loss", "eval_loss") if k in logs}
                self.bar.set_postfix(post, refresh=False)

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()

    return Progress()


def _trim_callback():
    """Give freed heap pages back to the OS after every step (glibc ``malloc_trim``). Batches of different lengths
    leave the heap fragmented: without this, peak RSS creeps up step after step although the live set does not.
    Costs well under a millisecond per step; a no-op where glibc is absent."""
    import ctypes
    import ctypes.util

    from transformers import TrainerCallback

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None

    class Trim(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            trim(0)

        def on_evaluate(self, args, state, control, **kw):
            trim(0)

    return Trim()


def _curves(log_history: list[dict]) -> tuple[list[dict], list[dict]]:
    """Train and eval loss per step from transformers' log history (restored from the checkpoint on resume, so
    a resumed run's record holds the whole curve)."""
    train_curve = [{"step": e["step"], "loss": round(float(e["loss"]), 5), "lr": float(e.get("learning_rate", 0.0))}
                   for e in log_history if "loss" in e]
    eval_curve = [{"step": e["step"], "loss": round(float(e["eval_loss"]), 5)} for e in log_history if "eval_loss" in e]
    return train_curve, eval_curve


@dataclass
class Rows:
    train: list[Row]
    eval: list[Row]
    files: list[DataFile]
    eval_files: list[DataFile]


def read_data(cfg: TrainConfig, base_dir: Path) -> Rows:
    """Read, check and split the rows: everything that can fail without the model, before it loads."""
    train_rows, train_files = read_files([resolve(base_dir, p) for p in cfg.data.train])
    if cfg.data.eval:
        eval_rows, eval_files = read_files([resolve(base_dir, p) for p in cfg.data.eval])
    else:
        train_rows, eval_rows = split(train_rows, cfg.data.eval_fraction, cfg.train.seed)
        eval_files = []
    if len(train_rows) < cfg.data.min_rows:
        raise DataError(f"only {len(train_rows)} usable train rows, fewer than data.min_rows={cfg.data.min_rows}")
    return Rows(train_rows, eval_rows, train_files, eval_files)


def prepare(cfg: TrainConfig, base_dir: Path, tokenizer, rows: Rows | None = None) -> tuple[list[Example], list[Example], dict]:
    """Tokenize the rows (reading them first unless given); fail before any training when they cannot be used."""
    rows = rows or read_data(cfg, base_dir)
    train, dropped = encode_all(rows.train, tokenizer, cfg.data.max_seq_len)
    evals, eval_dropped = encode_all(rows.eval, tokenizer, cfg.data.max_seq_len)
    if len(train) < cfg.data.min_rows:
        why = f" ({dropped} rows left no answer token within max_seq_len={cfg.data.max_seq_len})" if dropped else ""
        raise DataError(f"only {len(train)} usable train rows, fewer than data.min_rows={cfg.data.min_rows}{why}")
    info = {
        "files": [asdict(f) for f in rows.files], "eval_files": [asdict(f) for f in rows.eval_files],
        "train_rows": len(train), "eval_rows": len(evals), "dropped_rows": dropped + eval_dropped,
        "train_tokens": sum(len(e.input_ids) for e in train),
        "loss_tokens": sum(sum(t != -100 for t in e.labels) for e in train),
    }
    return train, evals, info


def train(cfg: TrainConfig, base_dir: Path, *, resume: bool = False, progress: bool = True,
          callbacks: list | None = None) -> TrainResult:
    import torch

    from loraplex.server.model.loader import ModelSpec, load_model

    out = resolve(base_dir, cfg.output_dir)
    ckpt_dir = out / CHECKPOINTS_DIR
    checkpoint = last_checkpoint(ckpt_dir) if resume else None
    if resume and checkpoint is None:
        raise TrainConfigError(f"nothing to resume: no complete checkpoint in {ckpt_dir}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise TrainConfigError("device cuda asked for, but torch sees no CUDA device")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    dtype = _compute_dtype(cfg)
    started = time.time()
    rows = read_data(cfg, base_dir)  # a bad row or too few rows fail here, before the model loads
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()

    # NF4: load and quantize exactly as the server does (bf16 weights -> NF4), then compute in `dtype`. Loading in
    # fp32 first would also hold every weight in fp32 for a moment (a higher peak RSS) for the same NF4 codes.
    load_dtype = "bfloat16" if cfg.quantize == "nf4" else dtype
    loaded = load_model(ModelSpec(model=cfg.model, quantize=cfg.quantize, dtype=load_dtype, device=cfg.device))
    if cfg.quantize == "nf4":
        set_4bit_compute_dtype(loaded.model, getattr(torch, dtype))
    tokenizer = loaded.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise TrainConfigError(f"base model {cfg.model} has no tokenizer with a chat template to format the rows")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_ex, eval_ex, data_info = prepare(cfg, base_dir, tokenizer, rows)

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from trl import SFTConfig, SFTTrainer

    model = loaded.model
    model.requires_grad_(False)
    keep_trainable_4bit_path(model)
    if cfg.quantize != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    torch.manual_seed(cfg.train.seed)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, use_rslora=cfg.lora.rslora, use_dora=cfg.lora.dora,
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)

    steps_per_epoch = -(-len(train_ex) // (cfg.train.batch_size * cfg.train.gradient_accumulation))
    total = cfg.train.max_steps or max(1, round(steps_per_epoch * cfg.train.epochs))
    args = SFTConfig(
        output_dir=str(ckpt_dir), max_steps=total, learning_rate=cfg.train.learning_rate,
        lr_scheduler_type=cfg.train.scheduler, warmup_steps=cfg.train.warmup_steps,
        weight_decay=cfg.train.weight_decay, per_device_train_batch_size=cfg.train.batch_size,
        per_device_eval_batch_size=cfg.train.batch_size, gradient_accumulation_steps=cfg.train.gradient_accumulation,
        gradient_checkpointing=cfg.train.gradient_checkpointing, seed=cfg.train.seed, data_seed=cfg.train.seed,
        save_strategy="steps", save_steps=cfg.train.save_steps, save_total_limit=2,
        eval_strategy="steps" if (cfg.train.eval_steps and eval_ex) else "no", eval_steps=cfg.train.eval_steps,
        logging_steps=cfg.train.log_steps, logging_first_step=True, report_to="none", disable_tqdm=True,
        max_length=cfg.data.max_seq_len, packing=cfg.data.packing, dataloader_num_workers=0,
        use_cpu=cfg.device == "cpu", bf16=False, fp16=False, optim="adamw_torch", prediction_loss_only=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=_dataset(train_ex),
                         eval_dataset=_dataset(eval_ex) if eval_ex else None, processing_class=tokenizer,
                         callbacks=[c for c in (_progress_callback(total, progress), _trim_callback(), *(callbacks or []))
                                    if c is not None])
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)

    # Eval loss before any training: the baseline the record's improvement is measured from.
    initial_path = out / INITIAL_EVAL_FILE
    initial_eval = None
    if eval_ex and checkpoint is None:
        initial_eval = round(float(trainer.evaluate()["eval_loss"]), 5)
        out.mkdir(parents=True, exist_ok=True)
        initial_path.write_text(json.dumps({"eval_loss": initial_eval}))
    elif initial_path.is_file():
        initial_eval = json.loads(initial_path.read_text()).get("eval_loss")

    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = time.perf_counter() - t0
    train_curve, eval_curve = _curves(trainer.state.log_history)
    final_eval = None
    if eval_ex:
        if eval_curve and eval_curve[-1]["step"] == trainer.state.global_step:
            final_eval = eval_curve[-1]["loss"]
        else:
            final_eval = round(float(trainer.evaluate()["eval_loss"]), 5)
            eval_curve.append({"step": trainer.state.global_step, "loss": final_eval})
    if initial_eval is not None:
        eval_curve.insert(0, {"step": 0, "loss": initial_eval})

    # The adapter: written beside, then renamed into place, so a kill never leaves a half folder.
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{ADAPTER_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    _declare_base(tmp / "adapter_config.json", cfg.model)
    final = out / ADAPTER_DIR
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)

    record = {
        "config": cfg.model_dump(mode="json"), "base_model": loaded.info.id, "compute_dtype": dtype,
        "data": data_info, "steps": trainer.state.global_step, "resumed": resume,
        "train_loss": train_curve, "eval_loss": eval_curve, "initial_eval_loss": initial_eval,
        "final_train_loss": train_curve[-1]["loss"] if train_curve else round(float(result.training_loss), 5),
        "final_eval_loss": final_eval,
        "train_seconds": round(train_seconds, 2), "total_seconds": round(time.time() - started, 2),
        "steps_per_second": round(result.metrics.get("train_steps_per_second", 0.0), 4),
        "versions": _versions(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    record_path = out / RECORD_FILE
    tmp_rec = record_path.with_suffix(".json.tmp")
    tmp_rec.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp_rec, record_path)
    return TrainResult(final, record, record_path)


def set_4bit_compute_dtype(model, dtype) -> None:
    for module in model.modules():
        if hasattr(module, "compute_type_is_set"):  # bitsandbytes Linear4bit
            module.compute_dtype = dtype
            module.compute_type_is_set = True


def keep_trainable_4bit_path(model) -> int:
    """Stop bitsandbytes from repacking NF4 weights for CPU inference during an eval.

    On CPUs with AVX512-BF16, ``Linear4bit.forward`` in eval mode under no_grad converts its weight, in place and
    for good, to a packed layout served by ``gemv_4bit``, which has no autograd formula: back in training, the
    gradient stops at every such layer (torch only warns "an autograd kernel was not registered") and the LoRA
    factors below it learn nothing. Any eval (ours before training, a callback that generates) would trigger
    it. Returns how many layers were switched off."""
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def last_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint that was written whole. transformers writes ``trainer_state.json`` last, so a
    checkpoint without a readable one was cut by a kill: it is removed, and the one before it is used."""
    found = []
    for p in ckpt_dir.glob("checkpoint-*"):
        step = p.name.removeprefix("checkpoint-")
        if p.is_dir() and step.isdigit():
            found.append((int(step), p))
    for _, p in sorted(found, reverse=True):
        try:
            json.loads((p / "trainer_state.json").read_text())
            return p
        except (OSError, ValueError):
            shutil.rmtree(p, ignore_errors=True)
    return None


def _declare_base(config_path: Path, model: str) -> None:
    """PEFT writes the local weights folder as the base; declare the model as loraplex names it instead, so
    ``loraplex push`` ties the adapter to the base it is served on. Also make the file reproducible: the same
    training gives the same bytes, so pushing it twice stores one version."""
    cfg = json.loads(config_path.read_text())
    if isinstance(cfg.get("target_modules"), list):  # PEFT writes a set: its order changes with hash seeds
        cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg["base_model_name_or_path"] = model if not Path(model).expanduser().exists() else str(Path(model).expanduser().resolve())
    config_path.write_text(json.dumps(cfg, indent=2) + "\n")
