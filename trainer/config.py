"""The training configuration: one YAML file plus ``key=value`` overrides, validated at the edge.

Every key, its default and its meaning are here (pydantic models with a description per field) and in
``examples/train.yaml``, which a test keeps in step with this file. Unknown keys, wrong types and
impossible values are errors that name the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loraplex.adapters.errors import LoraplexError


class TrainConfigError(LoraplexError):
    """A training config or override that cannot be used."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSection(_Section):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank")
    alpha: float = Field(32, gt=0, description="LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rslora)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input during training (0: no copy of each input)")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="modules to adapt: all-linear, or a list such as [q_proj, v_proj]")
    rslora: bool = Field(False, description="rank-stabilized scaling alpha/sqrt(r)")
    dora: bool = Field(False, description="weight-decomposed LoRA (DoRA); note: the native engine serves plain LoRA only")

    @field_validator("target_modules")
    @classmethod
    def _modules(cls, v):
        if isinstance(v, list) and (not v or not all(isinstance(m, str) and m.isidentifier() for m in v)):
            raise ValueError("must be all-linear or a non-empty list of module names such as q_proj")
        return v


class DataSection(_Section):
    train: list[str] = Field(..., min_length=1, description="JSONL files of chat rows (messages) or alpaca rows "
                                                            "(instruction, input, output); relative to the config file")
    eval: list[str] = Field(default_factory=list, description="held-out JSONL files for eval loss; empty: split "
                                                              "eval_fraction of the train rows off")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="share of train rows held out when eval is empty")
    max_seq_len: int = Field(256, ge=16, le=32768, description="longer rows are cut to this many tokens")
    packing: bool = Field(False, description="pack several rows into each max_seq_len sequence (no padding)")
    min_rows: int = Field(16, ge=1, description="fewer usable train rows than this is an error before training")


class TrainSection(_Section):
    epochs: float = Field(3.0, gt=0, description="passes over the train rows (ignored when max_steps is set)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    learning_rate: float = Field(1e-3, gt=0, lt=1, description="peak learning rate (AdamW)")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="learning-rate schedule after warmup")
    warmup_steps: int = Field(5, ge=0, description="steps of linear warmup")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    batch_size: int = Field(4, ge=1, le=4096, description="rows per forward pass")
    gradient_accumulation: int = Field(1, ge=1, description="forward passes per optimizer step")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, slower")
    seed: int = Field(0, ge=0, description="seed for the split, the data order, dropout and LoRA init")
    save_steps: int = Field(25, ge=1, description="write a resumable checkpoint every N steps")
    eval_steps: int | None = Field(None, ge=1, description="eval loss every N steps (default: at the end only)")
    log_steps: int = Field(5, ge=1, description="record the train loss every N steps")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the matmuls: auto is float32 on CPU (bf16 matmuls are slower there), "
                            "bfloat16 on CUDA")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: torch's choice)")


class TrainConfig(_Section):
    model: str = Field("smollm2-135m-instruct", description="base model: the embedded default or a local HF folder, "
                                                            "resolved as loraplex serve does")
    quantize: Literal["nf4", "none"] = Field("nf4", description="nf4: QLoRA on the 4-bit base the server keeps "
                                                                "resident; none: LoRA on the unquantized base")
    device: Literal["cpu", "cuda"] = Field("cpu", description="where to train")
    output_dir: str = Field("runs/adapter", description="checkpoints, the adapter folder and training.json go here; "
                                                        "relative to the config file")
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise TrainConfigError(f"override {item!r} is not key=value (e.g. train.max_steps=50)")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _set(tree: dict, path: list[str], value: Any, item: str) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise TrainConfigError(f"override {item!r}: {part} is not a section")
        node = child
    node[path[-1]] = value


def _first_error(exc: ValidationError, source: str) -> TrainConfigError:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    return TrainConfigError(f"{source}: {where}: {msg}")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> tuple[TrainConfig, Path]:
    """Read the YAML file (or nothing), apply overrides, validate; returns the config and the folder that relative
    paths in it are relative to (the config file's folder, or the working directory)."""
    tree: dict = {}
    base = Path.cwd()
    source = "config"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            text = p.read_text()
        except OSError as exc:
            raise TrainConfigError(f"cannot read config {p}: {exc.strerror or exc}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise TrainConfigError(f"{p}:{where} not valid YAML") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise TrainConfigError(f"{p}: the top level must be a mapping of keys")
        tree = loaded or {}
        base = p.resolve().parent
    for item in overrides:
        keys, value = _parse_override(item)
        _set(tree, keys, value, item)
    try:
        return TrainConfig.model_validate(tree), base
    except ValidationError as exc:
        raise _first_error(exc, source) from None


def resolve(base: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else base / q
