"""PEFT LoRA adapters on disk: parsing ``adapter_config.json`` and validating the tensors.

An adapter folder holds ``adapter_config.json`` (PEFT's LoraConfig) and
``adapter_model.safetensors`` whose keys look like
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` with shapes
``lora_A: [r, in_features]`` and ``lora_B: [out_features, r]``. ``validate_adapter`` checks it all,
without torch, and returns an ``AdapterSpec`` summary.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .basemodel import BaseModelInfo
from .errors import IncompatibleBaseError, InvalidAdapterError
from .tensorfile import FLOAT_DTYPES, TensorFile, float_chunks, read_header

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")

_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_magnitude_vector)(?:\.weight)?$")
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")

CONVERT_HINT = (
    "convert it: python -c \"import torch; from safetensors.torch import save_file; "
    "save_file(torch.load('adapter_model.bin', weights_only=True), 'adapter_model.safetensors')\""
)


# The largest magnitude an adapter may hold, in any tensor value and as lora_alpha (or an alpha_pattern value).
# Trained LoRA factors are small: PEFT starts A within +-1/sqrt(in_features) (0.04 for a 576-wide model) and
# B at 0, fine-tuning moves them by far less than 1, and SVD-based inits (PiSSA, OLoRA) hold singular vectors
# scaled by root singular values, single digits; alpha is commonly r to 2r (at most 512 for r <= 256). 1e4 is
# four orders of magnitude above what real adapters hold and representable in fp16 (max 65504), and it keeps a
# hostile adapter from carrying values like 1e30 that overflow activations by themselves. (A bounded adapter can
# still drive its own request's activations to inf; the engine keeps that from reaching any other request.)
MAX_ADAPTER_WEIGHT = 10.0  # |weight| of one adapter in a per-request mixture or merge (server and engine)
MAX_ABS_VALUE = 1e4


@dataclass(frozen=True, slots=True)
class Limits:
    max_rank: int = 256
    max_bytes: int = 4 * 1024**3
    max_tensors: int = 20_000
    max_config_bytes: int = 1024 * 1024
    max_abs_value: float = MAX_ABS_VALUE  # |tensor value| and |lora_alpha| (see MAX_ABS_VALUE)


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    """What validation learned about an adapter; recorded in its manifest."""

    rank: int
    alpha: float
    target_modules: list[str] | str
    use_rslora: bool
    use_dora: bool
    base_model_name_or_path: str | None
    modules: list[str]  # module paths carrying a LoRA pair, sorted
    num_params: int
    dtype: str
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)


def load_config(folder: Path, limits: Limits = Limits()) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise InvalidAdapterError(f"missing {CONFIG_FILE} in {folder}")
    if path.stat().st_size > limits.max_config_bytes:
        raise InvalidAdapterError(f"{CONFIG_FILE} is larger than {limits.max_config_bytes} bytes")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapterError(f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidAdapterError(f"{CONFIG_FILE} is not valid JSON: maximum nesting depth exceeded") from None
    if not isinstance(cfg, dict):
        raise InvalidAdapterError(f"{CONFIG_FILE} must hold a JSON object")
    return cfg


def _positive_int(cfg: dict, key: str, default: int | None = None) -> int:
    value = cfg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidAdapterError(f"{CONFIG_FILE}: {key} must be a positive integer, got {value!r}")
    return value


def _number(cfg: dict, key: str, default: float) -> float:
    value = cfg.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value or abs(value) == float("inf"):
        raise InvalidAdapterError(f"{CONFIG_FILE}: {key} must be a finite number, got {value!r}")
    return float(value)


def _bounded(value: float, what: str, limits: Limits) -> float:
    if abs(value) > limits.max_abs_value:
        raise InvalidAdapterError(f"{CONFIG_FILE}: {what} must be at most {limits.max_abs_value:g} in magnitude, got {value!r}")
    return value


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module path's suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def targets(target_modules: list[str] | str, module: str) -> bool:
    """PEFT's rule: a regex string must match the whole path; list entries match a path suffix."""
    if isinstance(target_modules, str):
        if target_modules == "all-linear":  # PEFT: every linear layer but the output head
            return not module.endswith("lm_head")
        return re.fullmatch(target_modules, module) is not None
    return module in target_modules or any(module.endswith("." + t) for t in target_modules)


def parse_config(cfg: dict, limits: Limits) -> dict:
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise InvalidAdapterError(f"{CONFIG_FILE}: unsupported peft_type {peft_type!r}; loraplex serves LORA adapters")
    rank = _positive_int(cfg, "r")
    alpha = _bounded(_number(cfg, "lora_alpha", 8), "lora_alpha", limits)
    tm = cfg.get("target_modules")
    if isinstance(tm, str):
        try:
            re.compile(tm)
        except re.error as exc:
            raise InvalidAdapterError(f"{CONFIG_FILE}: target_modules is not a valid regex: {exc}") from None
    elif not (isinstance(tm, list) and tm and all(isinstance(t, str) and t for t in tm)):
        raise InvalidAdapterError(f"{CONFIG_FILE}: target_modules must be a non-empty list of names or a regex string")
    rank_pattern = {} if cfg.get("rank_pattern") is None else cfg["rank_pattern"]
    alpha_pattern = {} if cfg.get("alpha_pattern") is None else cfg["alpha_pattern"]
    for key in ("use_rslora", "use_dora"):
        if not isinstance(cfg.get(key, False), bool):
            raise InvalidAdapterError(f"{CONFIG_FILE}: {key} must be true or false, got {cfg[key]!r}")
    for key, pat in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if not isinstance(pat, dict):
            raise InvalidAdapterError(f"{CONFIG_FILE}: {key} must be an object")
        for k in pat:
            _positive_int(pat, k) if key == "rank_pattern" else _bounded(_number(pat, k, 0), f"alpha_pattern[{k!r}]", limits)
            try:
                re.compile(k)
            except re.error as exc:
                raise InvalidAdapterError(f"{CONFIG_FILE}: {key} key {k!r} is not a valid regex: {exc}") from None
    for r in [rank, *rank_pattern.values()]:
        if r > limits.max_rank:
            raise InvalidAdapterError(f"{CONFIG_FILE}: rank {r} is above the limit of {limits.max_rank}")
    base = cfg.get("base_model_name_or_path")
    return {
        "rank": rank, "alpha": alpha, "target_modules": tm,
        "use_rslora": cfg.get("use_rslora", False), "use_dora": cfg.get("use_dora", False),
        "base_model_name_or_path": base if isinstance(base, str) else None,
        "rank_pattern": dict(rank_pattern), "alpha_pattern": {k: float(v) for k, v in alpha_pattern.items()},
    }


def check_folder(folder: Path, limits: Limits) -> None:
    if not folder.is_dir():
        raise InvalidAdapterError(f"adapter folder {folder} does not exist or is not a folder")
    for name in ADAPTER_FILES:
        p = folder / name
        if p.is_symlink():
            raise InvalidAdapterError(f"{name} is a symbolic link; push the file itself")
    if not (folder / WEIGHTS_FILE).is_file():
        pickles = [n for n in PICKLE_FILES if (folder / n).exists()]
        if pickles:
            raise InvalidAdapterError(
                f"{pickles[0]} is a pickle file, which can run code when loaded; loraplex accepts only "
                f"{WEIGHTS_FILE}: {CONVERT_HINT}"
            )
        raise InvalidAdapterError(f"missing {WEIGHTS_FILE} in {folder}")
    size = (folder / WEIGHTS_FILE).stat().st_size
    if size > limits.max_bytes:
        raise InvalidAdapterError(f"{WEIGHTS_FILE} is {size} bytes, above the limit of {limits.max_bytes}")


def validate_adapter(folder: Path, base: BaseModelInfo | None = None, limits: Limits = Limits()) -> AdapterSpec:
    """Check an adapter folder completely; raise InvalidAdapterError with a one-line reason."""
    folder = Path(folder)
    check_folder(folder, limits)
    conf = parse_config(load_config(folder, limits), limits)
    tf = read_header(folder / WEIGHTS_FILE)
    modules = _check_tensors(tf, conf, base, limits)
    _check_values(tf, limits.max_abs_value)
    dtypes = sorted({t.dtype for t in tf.tensors.values()})
    return AdapterSpec(
        **conf, modules=sorted(modules), num_params=sum(t.numel for t in tf.tensors.values()), dtype=",".join(dtypes)
    )


def _check_tensors(tf: TensorFile, conf: dict, base: BaseModelInfo | None, limits: Limits) -> set[str]:
    if not tf.tensors:
        raise InvalidAdapterError(f"{WEIGHTS_FILE} holds no tensors")
    if len(tf.tensors) > limits.max_tensors:
        raise InvalidAdapterError(f"{WEIGHTS_FILE} holds {len(tf.tensors)} tensors, above the limit of {limits.max_tensors}")
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, info in tf.tensors.items():
        m = _KEY_RE.match(name)
        if not m:
            raise InvalidAdapterError(
                f"unexpected tensor {name!r}: a LoRA adapter holds only '<module>.lora_A.weight' and "
                "'<module>.lora_B.weight' (modules_to_save and embedding LoRA are not supported)"
            )
        if info.dtype not in FLOAT_DTYPES:
            raise InvalidAdapterError(f"tensor {name!r} has dtype {info.dtype}; LoRA weights must be floating point")
        pairs.setdefault(m["module"], {})[m["kind"]] = info.shape
    shapes = base.module_shapes() if base else None
    for module, parts in sorted(pairs.items()):
        _check_module(module, parts, conf, base, shapes)
    return set(pairs)


def _check_module(module: str, parts: dict, conf: dict, base: BaseModelInfo | None, shapes: dict | None) -> None:
    if not targets(conf["target_modules"], module):
        raise InvalidAdapterError(f"tensors for module {module!r} but it is not in target_modules {conf['target_modules']!r}")
    for kind in ("lora_A", "lora_B"):
        if kind not in parts:
            raise InvalidAdapterError(f"module {module!r} has no {kind} tensor; LoRA needs both lora_A and lora_B")
    if "lora_magnitude_vector" in parts and not conf["use_dora"]:
        raise InvalidAdapterError(f"module {module!r} has a DoRA magnitude vector but use_dora is not set")
    a, b = parts["lora_A"], parts["lora_B"]
    if len(a) != 2 or len(b) != 2:
        raise InvalidAdapterError(f"module {module!r}: lora_A {list(a)} and lora_B {list(b)} must both be 2-D")
    r = pattern_value(conf["rank_pattern"], module, conf["rank"])
    if a[0] != r or b[1] != r:
        raise InvalidAdapterError(
            f"rank mismatch in module {module!r}: lora_A {list(a)} and lora_B {list(b)}, but adapter_config.json says r={r}"
        )
    in_f, out_f = a[1], b[0]
    if "lora_magnitude_vector" in parts and tuple(parts["lora_magnitude_vector"]) not in ((out_f,), (1, out_f)):
        raise InvalidAdapterError(f"module {module!r}: DoRA magnitude shape {list(parts['lora_magnitude_vector'])} != [{out_f}]")
    if base is None:
        return
    layer = _LAYER_RE.search(module)
    if layer and int(layer.group(1)) >= base.num_hidden_layers:
        raise IncompatibleBaseError(
            f"module {module!r} is in layer {layer.group(1)} but base model {base.id} has {base.num_hidden_layers} layers"
        )
    if shapes is None:
        return
    leaf = module.rsplit(".", 1)[-1]
    if leaf not in shapes:
        raise IncompatibleBaseError(f"module {module!r} is not a LoRA-targetable linear layer of base model {base.id}")
    want_in, want_out = shapes[leaf]
    if (in_f, out_f) != (want_in, want_out):
        raise IncompatibleBaseError(
            f"module {module!r} maps {in_f} -> {out_f} features but base model {base.id} "
            f"({base.fingerprint}) has {want_in} -> {want_out}"
        )


def _check_values(tf: TensorFile, bound: float, chunk_elems: int = 1 << 22) -> None:
    """Every float value finite and of magnitude at most ``bound``; one pass over the data, in chunks (numpy,
    no torch). Raises for the first tensor (in header order) that breaks either."""
    import numpy as np

    for info, values in float_chunks(tf, chunk_elems):
        peak = float(np.abs(values).max())  # NaN if any is NaN
        if peak != peak or peak == float("inf"):
            raise InvalidAdapterError(f"tensor {info.name!r} contains NaN or Inf values")
        if peak > bound:
            raise InvalidAdapterError(f"tensor {info.name!r} holds a value of magnitude {peak:.3g}, above the "
                                      f"limit of {bound:g}")
