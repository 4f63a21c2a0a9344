"""A corpus of malformed adapters, each with the exact error ``validate_adapter`` and ``push`` must give.

Every case is built in-process under tmp_path. Safetensors files are written by ``st_file`` below,
byte by byte (8-byte little-endian header length, compact JSON header, data), so that broken files
can be made on purpose, bf16 bits can be written although numpy has no bf16, and every size in an
expected message is deterministic. ``test_hand_built_file_is_real_safetensors`` checks that builder
against the safetensors library, and one positive case uses the library's own writer.
"""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from adapter_factory import ALL_MODULES, TINY_BASE_CONFIG, adapter_config, lora_tensors, write_adapter
from seaweed import ACCESS_KEY, SECRET_KEY

from loraplex.adapters import (
    AdapterRegistry, AdapterSpec, BaseModelInfo, IncompatibleBaseError, InvalidAdapterError, InvalidNameError, Limits,
    resolve_base_model, validate_adapter,
)
from loraplex.adapters.s3 import S3Storage

# ---- building blocks -------------------------------------------------------------------------

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

R = 4
SMALL_MODULES = ("q_proj",)  # keeps the corpus tiny: 2 layers x q_proj = 4 tensors of 1024 bytes each
CONFIG = adapter_config(R, SMALL_MODULES)

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
Q1 = "base_model.model.model.layers.1.self_attn.q_proj"
A0, B0, A1, B1 = f"{Q0}.lora_A.weight", f"{Q0}.lora_B.weight", f"{Q1}.lora_A.weight", f"{Q1}.lora_B.weight"
M0, M1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"  # module paths in messages

TINY_BASE = BaseModelInfo.from_hf_config("tiny-llama", TINY_BASE_CONFIG)
FP = TINY_BASE.fingerprint

_ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "int32": "I32", "int64": "I64", "uint8": "U8"}

Raw = tuple  # (dtype, shape, bytes): a tensor given by its safetensors dtype name and raw little-endian bytes


def raw(arr: np.ndarray) -> Raw:
    arr = np.ascontiguousarray(arr)
    return (_ST_DTYPES[arr.dtype.name], list(arr.shape), arr.astype(arr.dtype.newbyteorder("<")).tobytes())


def bf16(arr: np.ndarray, poke: dict[int, int] | None = None) -> Raw:
    """float32 -> bfloat16 (truncation), with optional raw uint16 bit patterns written at flat indices."""
    bits = (np.asarray(arr, dtype="<f4").view("<u4") >> 16).astype("<u2")
    flat = bits.reshape(-1)
    for index, value in (poke or {}).items():
        flat[index] = value
    return ("BF16", list(bits.shape), bits.tobytes())


def header_file(header: dict | list | bytes, data: bytes = b"") -> bytes:
    blob = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def st_file(tensors: dict[str, np.ndarray | Raw], metadata: dict | None = None, trailing: bytes = b"") -> bytes:
    """A safetensors file, tensors laid out in the given order."""
    header: dict = {} if metadata is None else {"__metadata__": metadata}
    data = b""
    for name, t in tensors.items():
        dtype, shape, blob = t if isinstance(t, tuple) else raw(t)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    return header_file(header, data + trailing)


def small_tensors(**kw) -> dict[str, np.ndarray]:
    """A0, B0, A1, B1 in that order: the r=4 q_proj adapter of the tiny base."""
    return lora_tensors(TINY_BASE_CONFIG, R, SMALL_MODULES, **kw)


def pair(module: str, r: int, in_f: int, out_f: int, dtype=np.float32, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"base_model.model.{module}.lora_A.weight": (rng.standard_normal((r, in_f)) * 0.02).astype(dtype),
            f"base_model.model.{module}.lora_B.weight": (rng.standard_normal((out_f, r)) * 0.02).astype(dtype)}


def adapter(folder: Path, *, config: dict | None = None, config_text: str | None = None,
            tensors: dict | None = None, weights: bytes | None = None) -> None:
    """Write an adapter folder: config (dict or raw text) and weights (tensors or raw bytes); None = the small one."""
    folder.mkdir(parents=True, exist_ok=True)
    text = config_text if config_text is not None else json.dumps(CONFIG if config is None else config)
    (folder / CONFIG_FILE).write_text(text)
    if weights is None:
        weights = st_file(small_tensors() if tensors is None else tensors)
    (folder / WEIGHTS_FILE).write_bytes(weights)


def cfg(**changes) -> dict:
    """CONFIG with keys changed; a value of ... removes the key."""
    out = dict(CONFIG)
    for k, v in changes.items():
        if v is ...:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def with_tensors(changes: dict, drop: tuple = ()) -> dict:
    t = small_tensors()
    for k in drop:
        del t[k]
    t.update(changes)
    return t


SMALL_WEIGHTS_SIZE = len(st_file(small_tensors()))  # header + 4 x 1024 bytes; checked to be 4594 below


# ---- the corpus ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Path], None]  # writes the adapter into the (not yet existing) folder
    error: type[Exception]
    message: str  # the exact message; "<folder>" stands for the adapter folder's path
    limits: Limits = field(default_factory=Limits)
    base: bool = False  # validate (and push) against the tiny base in base_dir
    bug: str | None = None  # a known bug of the code under test: the case is a strict xfail until fixed

    def expected(self, folder: Path) -> str:
        return self.message.replace("<folder>", str(folder))


def _symlinked(name: str) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        adapter(folder)
        real = folder.parent / f"{folder.name}-real-{name}"
        (folder / name).rename(real)
        (folder / name).symlink_to(real)
    return build


def _pickle_instead(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / CONFIG_FILE).write_text(json.dumps(CONFIG))
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({A0: np.zeros((R, 64), np.float32)}))


def _no_weights(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / CONFIG_FILE).write_text(json.dumps(CONFIG))


def _no_config(folder: Path) -> None:
    adapter(folder)
    (folder / CONFIG_FILE).unlink()


def _config_not_utf8(folder: Path) -> None:
    adapter(folder)
    (folder / CONFIG_FILE).write_bytes(b'{"r": "\xff"}')


def _truncated_data(folder: Path) -> None:
    adapter(folder, weights=st_file(small_tensors())[:-100])


def _nan_f32(folder: Path) -> None:
    t = small_tensors()
    t[B1] = t[B1].copy()
    t[B1][7, 2] = np.nan
    adapter(folder, tensors=t)


def _inf_f16(folder: Path) -> None:
    t = lora_tensors(TINY_BASE_CONFIG, R, SMALL_MODULES, dtype=np.float16)
    t[A1][0, 0] = np.inf
    adapter(folder, tensors=t)


def _bf16_bits(bits: int) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        t = small_tensors()
        adapter(folder, tensors={A0: bf16(t[A0]), B0: bf16(t[B0], poke={5: bits}), A1: bf16(t[A1]), B1: bf16(t[B1])})
    return build


_LAYOUT = {"dtype": "F32", "shape": [R, 64]}  # one 1024-byte tensor
KEY_HINT = ("a LoRA adapter holds only '<module>.lora_A.weight' and '<module>.lora_B.weight' "
            "(modules_to_save and embedding LoRA are not supported)")
CONVERT = ("convert it: python -c \"import torch; from safetensors.torch import save_file; "
           "save_file(torch.load('adapter_model.bin', weights_only=True), 'adapter_model.safetensors')\"")
ST = WEIGHTS_FILE
NOT_ST = f"{ST} is not a safetensors file"
REGEX_TM = r".*\.(q_proj|v_proj)"

CASES: list[Case] = [
    # -- the folder --------------------------------------------------------------------------
    Case("pickle-bin-instead-of-safetensors", _pickle_instead, InvalidAdapterError,
         "adapter_model.bin is a pickle file, which can run code when loaded; loraplex accepts only "
         f"adapter_model.safetensors: {CONVERT}"),
    Case("missing-weights", _no_weights, InvalidAdapterError, "missing adapter_model.safetensors in <folder>"),
    Case("missing-config", _no_config, InvalidAdapterError, "missing adapter_config.json in <folder>"),
    Case("weights-symlink", _symlinked(WEIGHTS_FILE), InvalidAdapterError,
         "adapter_model.safetensors is a symbolic link; push the file itself"),
    Case("config-symlink", _symlinked(CONFIG_FILE), InvalidAdapterError,
         "adapter_config.json is a symbolic link; push the file itself"),
    Case("weights-above-max-bytes", lambda f: adapter(f), InvalidAdapterError,
         "adapter_model.safetensors is 4594 bytes, above the limit of 4593", limits=Limits(max_bytes=4593)),
    # -- adapter_config.json ---------------------------------------------------------------------
    Case("config-not-json", lambda f: adapter(f, config_text="{'peft_type': 'LORA'}"), InvalidAdapterError,
         "adapter_config.json is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    Case("config-not-utf8", _config_not_utf8, InvalidAdapterError,
         "adapter_config.json is not valid JSON: 'utf-8' codec can't decode byte 0xff in position 7: invalid start byte"),
    Case("config-json-array", lambda f: adapter(f, config_text='["LORA"]'), InvalidAdapterError,
         "adapter_config.json must hold a JSON object"),
    Case("config-above-max-config-bytes", lambda f: adapter(f), InvalidAdapterError,
         "adapter_config.json is larger than 64 bytes", limits=Limits(max_config_bytes=64)),
    Case("config-deeply-nested", lambda f: adapter(f, config_text="[" * 200_000), InvalidAdapterError,
         "adapter_config.json is not valid JSON: maximum nesting depth exceeded"),
    Case("peft-type-prefix-tuning", lambda f: adapter(f, config=cfg(peft_type="PREFIX_TUNING")), InvalidAdapterError,
         "adapter_config.json: unsupported peft_type 'PREFIX_TUNING'; loraplex serves LORA adapters"),
    Case("peft-type-missing", lambda f: adapter(f, config=cfg(peft_type=...)), InvalidAdapterError,
         "adapter_config.json: unsupported peft_type None; loraplex serves LORA adapters"),
    Case("r-missing", lambda f: adapter(f, config=cfg(r=...)), InvalidAdapterError,
         "adapter_config.json: r must be a positive integer, got None"),
    Case("r-zero", lambda f: adapter(f, config=cfg(r=0)), InvalidAdapterError,
         "adapter_config.json: r must be a positive integer, got 0"),
    Case("r-string", lambda f: adapter(f, config=cfg(r="8")), InvalidAdapterError,
         "adapter_config.json: r must be a positive integer, got '8'"),
    Case("r-bool", lambda f: adapter(f, config=cfg(r=True)), InvalidAdapterError,
         "adapter_config.json: r must be a positive integer, got True"),
    Case("r-float", lambda f: adapter(f, config=cfg(r=4.0)), InvalidAdapterError,
         "adapter_config.json: r must be a positive integer, got 4.0"),
    Case("lora-alpha-nan", lambda f: adapter(f, config=cfg(lora_alpha=float("nan"))), InvalidAdapterError,
         "adapter_config.json: lora_alpha must be a finite number, got nan"),
    Case("lora-alpha-string", lambda f: adapter(f, config=cfg(lora_alpha="16")), InvalidAdapterError,
         "adapter_config.json: lora_alpha must be a finite number, got '16'"),
    Case("rank-above-default-limit", lambda f: adapter(f, config=cfg(r=257)), InvalidAdapterError,
         "adapter_config.json: rank 257 is above the limit of 256"),
    Case("rank-above-custom-limit", lambda f: adapter(f), InvalidAdapterError,
         "adapter_config.json: rank 4 is above the limit of 2", limits=Limits(max_rank=2)),
    Case("rank-pattern-above-limit", lambda f: adapter(f, config=cfg(rank_pattern={"v_proj": 512})), InvalidAdapterError,
         "adapter_config.json: rank 512 is above the limit of 256"),
    Case("rank-pattern-zero", lambda f: adapter(f, config=cfg(rank_pattern={"q_proj": 0})), InvalidAdapterError,
         "adapter_config.json: q_proj must be a positive integer, got 0"),
    Case("rank-pattern-not-object", lambda f: adapter(f, config=cfg(rank_pattern=["q_proj", 8])), InvalidAdapterError,
         "adapter_config.json: rank_pattern must be an object"),
    Case("rank-pattern-bad-regex", lambda f: adapter(f, config=cfg(rank_pattern={"q_proj[": 8})), InvalidAdapterError,
         "adapter_config.json: rank_pattern key 'q_proj[' is not a valid regex: unterminated character set at position 6"),
    Case("target-modules-bad-regex", lambda f: adapter(f, config=cfg(target_modules="(q_proj|v_proj")),
         InvalidAdapterError,
         "adapter_config.json: target_modules is not a valid regex: missing ), unterminated subpattern at position 0"),
    Case("target-modules-empty-list", lambda f: adapter(f, config=cfg(target_modules=[])), InvalidAdapterError,
         "adapter_config.json: target_modules must be a non-empty list of names or a regex string"),
    Case("target-modules-missing", lambda f: adapter(f, config=cfg(target_modules=...)), InvalidAdapterError,
         "adapter_config.json: target_modules must be a non-empty list of names or a regex string"),
    # -- the safetensors container ------------------------------------------------------------------
    Case("weights-shorter-than-8-bytes", lambda f: adapter(f, weights=b"\x10\x00\x00"), InvalidAdapterError,
         f"{NOT_ST}: 3 bytes is shorter than its header"),
    Case("header-length-absurd", lambda f: adapter(f, weights=struct.pack("<Q", 2**40) + b"{}"), InvalidAdapterError,
         f"{NOT_ST}: header length 1099511627776 is not plausible"),
    Case("header-length-zero", lambda f: adapter(f, weights=struct.pack("<Q", 0) + b"{}"), InvalidAdapterError,
         f"{NOT_ST}: header length 0 is not plausible"),
    Case("truncated-in-header", lambda f: adapter(f, weights=struct.pack("<Q", 1000) + b'{"a":'), InvalidAdapterError,
         f"{ST} is truncated: header of 1000 bytes but the file has 13 bytes"),
    Case("truncated-data", _truncated_data, InvalidAdapterError,
         f"{ST} is truncated: header declares 4096 bytes of tensor data but the file holds 3996"),
    Case("header-not-json", lambda f: adapter(f, weights=header_file(b"{not json}")), InvalidAdapterError,
         f"{NOT_ST}: header is not JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
    Case("header-not-utf8", lambda f: adapter(f, weights=header_file(b"\xff\xfe{}")), InvalidAdapterError,
         f"{NOT_ST}: header is not JSON ('utf-8' codec can't decode byte 0xff in position 0: invalid start byte)"),
    Case("header-json-array", lambda f: adapter(f, weights=header_file([{"dtype": "F32"}])), InvalidAdapterError,
         f"{NOT_ST}: header is not a JSON object"),
    Case("header-json-string", lambda f: adapter(f, weights=header_file(b'"tensors"')), InvalidAdapterError,
         f"{NOT_ST}: header is not a JSON object"),
    Case("header-deeply-nested", lambda f: adapter(f, weights=header_file(b"[" * 200_000)), InvalidAdapterError,
         f"{NOT_ST}: header is not JSON (maximum nesting depth exceeded)"),
    Case("metadata-not-strings", lambda f: adapter(f, weights=st_file(small_tensors(), metadata={"format": 1})),
         InvalidAdapterError, f"{ST}: __metadata__ must map strings to strings"),
    Case("entry-not-object", lambda f: adapter(f, weights=header_file({A0: [0, 1024]}, bytes(1024))),
         InvalidAdapterError, f"{ST}: entry for tensor {A0!r} is not an object"),
    Case("unknown-dtype", lambda f: adapter(f, weights=header_file(
        {A0: {"dtype": "Q4_K", "shape": [R, 64], "data_offsets": [0, 1024]}}, bytes(1024))),
         InvalidAdapterError, f"{ST}: tensor {A0!r} has unknown dtype 'Q4_K'"),
    Case("dtype-not-a-string", lambda f: adapter(f, weights=header_file(
        {A0: {"dtype": ["F32"], "shape": [R, 64], "data_offsets": [0, 1024]}}, bytes(1024))),
         InvalidAdapterError, f"{ST}: tensor {A0!r} has unknown dtype ['F32']"),
    Case("negative-shape", lambda f: adapter(f, weights=header_file(
        {A0: {"dtype": "F32", "shape": [-4, 64], "data_offsets": [0, 1024]}}, bytes(1024))),
         InvalidAdapterError, f"{ST}: tensor {A0!r} has an invalid shape [-4, 64]"),
    Case("offsets-reversed", lambda f: adapter(f, weights=header_file(
        {A0: {**_LAYOUT, "data_offsets": [1024, 0]}}, bytes(1024))),
         InvalidAdapterError, f"{ST}: tensor {A0!r} has invalid data_offsets [1024, 0]"),
    Case("offsets-dont-match-shape", lambda f: adapter(f, weights=header_file(
        {A0: {**_LAYOUT, "data_offsets": [0, 1000]}}, bytes(1000))),
         InvalidAdapterError, f"{ST}: tensor {A0!r} of shape [4, 64] F32 needs 1024 bytes but its offsets span 1000"),
    Case("overlapping-tensors", lambda f: adapter(f, weights=header_file(
        {A0: {**_LAYOUT, "data_offsets": [0, 1024]}, B0: {"dtype": "F32", "shape": [64, R], "data_offsets": [512, 1536]}},
        bytes(1536))),
         InvalidAdapterError, f"{ST}: tensor {B0!r} overlaps another tensor (offset 512, expected 1024)"),
    Case("gap-between-tensors", lambda f: adapter(f, weights=header_file(
        {A0: {**_LAYOUT, "data_offsets": [0, 1024]}, B0: {"dtype": "F32", "shape": [64, R], "data_offsets": [1040, 2064]}},
        bytes(2064))),
         InvalidAdapterError, f"{ST}: tensor {B0!r} leaves a gap before it (offset 1040, expected 1024)"),
    Case("trailing-bytes", lambda f: adapter(f, weights=st_file(small_tensors(), trailing=b"PAYLOAD")),
         InvalidAdapterError, f"{ST}: 7 trailing bytes after the last tensor"),
    # -- the tensors ----------------------------------------------------------------------------------
    Case("no-tensors", lambda f: adapter(f, weights=header_file({})), InvalidAdapterError, f"{ST} holds no tensors"),
    Case("only-metadata", lambda f: adapter(f, weights=st_file({}, metadata={"format": "pt"})), InvalidAdapterError,
         f"{ST} holds no tensors"),
    Case("more-tensors-than-limit", lambda f: adapter(f), InvalidAdapterError,
         f"{ST} holds 4 tensors, above the limit of 3", limits=Limits(max_tensors=3)),
    Case("embedding-lora-key", lambda f: adapter(f, tensors=with_tensors(
        {"base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((R, 256), np.float32)})),
         InvalidAdapterError,
         f"unexpected tensor 'base_model.model.model.embed_tokens.lora_embedding_A': {KEY_HINT}"),
    Case("modules-to-save-key", lambda f: adapter(f, tensors=with_tensors(
        {"base_model.model.lm_head.weight": np.zeros((256, 64), np.float32)})),
         InvalidAdapterError, f"unexpected tensor 'base_model.model.lm_head.weight': {KEY_HINT}"),
    Case("adapter-name-in-key", lambda f: adapter(f, tensors={f"{Q0}.lora_A.default.weight": small_tensors()[A0]}),
         InvalidAdapterError, f"unexpected tensor '{Q0}.lora_A.default.weight': {KEY_HINT}"),
    Case("integer-dtype-i32", lambda f: adapter(f, tensors=with_tensors({A0: np.ones((R, 64), np.int32)})),
         InvalidAdapterError, f"tensor {A0!r} has dtype I32; LoRA weights must be floating point"),
    Case("module-not-in-target-modules", lambda f: adapter(f, tensors=with_tensors(
        pair("model.layers.0.self_attn.v_proj", R, 64, 32))),
         InvalidAdapterError,
         "tensors for module 'model.layers.0.self_attn.v_proj' but it is not in target_modules ['q_proj']"),
    Case("module-not-matched-by-regex", lambda f: adapter(f, config=cfg(target_modules=REGEX_TM), tensors=with_tensors(
        pair("model.layers.0.self_attn.k_proj", R, 64, 32))),
         InvalidAdapterError,
         f"tensors for module 'model.layers.0.self_attn.k_proj' but it is not in target_modules {REGEX_TM!r}"),
    Case("lora-a-without-lora-b", lambda f: adapter(f, tensors=with_tensors({}, drop=(B1,))), InvalidAdapterError,
         f"module {M1!r} has no lora_B tensor; LoRA needs both lora_A and lora_B"),
    Case("lora-b-without-lora-a", lambda f: adapter(f, tensors=with_tensors({}, drop=(A0,))), InvalidAdapterError,
         f"module {M0!r} has no lora_A tensor; LoRA needs both lora_A and lora_B"),
    Case("one-d-lora-tensor", lambda f: adapter(f, tensors=with_tensors({A0: np.zeros(R * 64, np.float32)})),
         InvalidAdapterError, f"module {M0!r}: lora_A [256] and lora_B [64, 4] must both be 2-D"),
    Case("rank-mismatch-config-vs-tensors", lambda f: adapter(f, config=cfg(r=8)), InvalidAdapterError,
         f"rank mismatch in module {M0!r}: lora_A [4, 64] and lora_B [64, 4], but adapter_config.json says r=8"),
    Case("rank-mismatch-a-vs-b", lambda f: adapter(f, tensors=with_tensors({B1: np.zeros((64, 2), np.float32)})),
         InvalidAdapterError,
         f"rank mismatch in module {M1!r}: lora_A [4, 64] and lora_B [64, 2], but adapter_config.json says r=4"),
    Case("rank-pattern-mismatch", lambda f: adapter(f, config=cfg(rank_pattern={"layers.1.self_attn.q_proj": 8})),
         InvalidAdapterError,
         f"rank mismatch in module {M1!r}: lora_A [4, 64] and lora_B [64, 4], but adapter_config.json says r=8"),
    Case("dora-vector-without-use-dora", lambda f: adapter(f, tensors=with_tensors(
        {f"{Q0}.lora_magnitude_vector": np.ones(64, np.float32)})),
         InvalidAdapterError, f"module {M0!r} has a DoRA magnitude vector but use_dora is not set"),
    Case("dora-vector-wrong-shape", lambda f: adapter(f, config=cfg(use_dora=True), tensors=with_tensors(
        {f"{Q0}.lora_magnitude_vector": np.ones(32, np.float32)})),
         InvalidAdapterError, f"module {M0!r}: DoRA magnitude shape [32] != [64]"),
    Case("nan-float32", _nan_f32, InvalidAdapterError, f"tensor {B1!r} contains NaN or Inf values"),
    Case("inf-float16", _inf_f16, InvalidAdapterError, f"tensor {A1!r} contains NaN or Inf values"),
    Case("nan-bfloat16", _bf16_bits(0x7FC0), InvalidAdapterError, f"tensor {B0!r} contains NaN or Inf values"),
    Case("negative-inf-bfloat16", _bf16_bits(0xFF80), InvalidAdapterError, f"tensor {B0!r} contains NaN or Inf values"),
    Case("value-above-bound", lambda f: adapter(f, tensors=with_tensors({B1: np.full((64, R), -2e4, np.float32)})),
         InvalidAdapterError, f"tensor {B1!r} holds a value of magnitude 2e+04, above the limit of 10000"),
    Case("lora-alpha-above-bound", lambda f: adapter(f, config=cfg(lora_alpha=1e30)), InvalidAdapterError,
         "adapter_config.json: lora_alpha must be at most 10000 in magnitude, got 1e+30"),
    # -- against the tiny base (base_dir) --------------------------------------------------------------
    Case("in-features-mismatch", lambda f: adapter(f, tensors=pair(M0, R, 32, 64)), IncompatibleBaseError,
         f"module {M0!r} maps 32 -> 64 features but base model tiny-llama ({FP}) has 64 -> 64", base=True),
    Case("out-features-mismatch", lambda f: adapter(f, config=cfg(target_modules=["k_proj"]),
                                                    tensors=pair("model.layers.0.self_attn.k_proj", R, 64, 64)),
         IncompatibleBaseError,
         f"module 'model.layers.0.self_attn.k_proj' maps 64 -> 64 features but base model tiny-llama ({FP}) has 64 -> 32",
         base=True),
    Case("layer-beyond-num-hidden-layers", lambda f: adapter(f, tensors=lora_tensors(
        {**TINY_BASE_CONFIG, "num_hidden_layers": 3}, R, SMALL_MODULES)),
         IncompatibleBaseError,
         "module 'model.layers.2.self_attn.q_proj' is in layer 2 but base model tiny-llama has 2 layers", base=True),
    Case("module-not-a-base-linear", lambda f: adapter(f, config=cfg(target_modules=["qkv_proj"]),
                                                       tensors=pair("model.layers.0.self_attn.qkv_proj", R, 64, 128)),
         IncompatibleBaseError,
         "module 'model.layers.0.self_attn.qkv_proj' is not a LoRA-targetable linear layer of base model tiny-llama",
         base=True),
]


def _params(cases: list[Case]):
    return [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, raises=(TypeError, RecursionError),
                                                                reason=c.bug)] if c.bug else [])
            for c in cases]


def test_corpus_is_large_and_ids_are_unique():
    assert len(CASES) >= 16
    assert len({c.id for c in CASES}) == len(CASES)


def test_hand_built_file_is_real_safetensors(tmp_path):
    """The builder above writes what the safetensors library writes and reads."""
    from safetensors.numpy import load_file

    t = small_tensors()
    path = tmp_path / "x.safetensors"
    path.write_bytes(st_file(t))
    assert SMALL_WEIGHTS_SIZE == path.stat().st_size == 4594  # the size in "weights-above-max-bytes"
    loaded = load_file(str(path))
    assert loaded.keys() == t.keys() and all(np.array_equal(loaded[k], t[k]) for k in t)


@pytest.fixture
def tiny_base(base_dir) -> BaseModelInfo:
    base = resolve_base_model(str(base_dir))
    assert base == TINY_BASE
    return base


@pytest.mark.parametrize("case", _params(CASES))
def test_malformed_adapter_is_refused_with_its_exact_error(case: Case, tmp_path, tiny_base):
    folder = tmp_path / "adapter"
    case.build(folder)
    with pytest.raises(InvalidAdapterError) as info:
        validate_adapter(folder, tiny_base if case.base else None, case.limits)
    assert type(info.value) is case.error
    assert str(info.value) == case.expected(folder)


def test_pickle_message_says_how_to_convert(tmp_path):
    folder = tmp_path / "adapter"
    _pickle_instead(folder)
    with pytest.raises(InvalidAdapterError, match=r"pickle file.*convert it: .*save_file\(torch\.load\(") as info:
        validate_adapter(folder)
    assert "adapter_model.safetensors" in str(info.value)


def test_bad_values_are_found_in_any_chunk(tmp_path):
    """non-finite values past the first read chunk are found too (small chunk via a big tensor)."""
    t = lora_tensors(TINY_BASE_CONFIG, 256, SMALL_MODULES)  # 256 x 64 f32: 64 KiB per tensor
    t[A1] = t[A1].copy()
    t[A1][-1, -1] = np.inf  # the very last element of the tensor
    folder = tmp_path / "adapter"
    adapter(folder, config=cfg(r=256), tensors=t)
    from loraplex.adapters.tensorfile import non_finite_tensors, read_header

    assert non_finite_tensors(read_header(folder / WEIGHTS_FILE), chunk_elems=1000) == [A1]
    with pytest.raises(InvalidAdapterError, match=rf"^tensor '{A1}' contains NaN or Inf values$"):
        validate_adapter(folder)


# ---- adapters that must pass ------------------------------------------------------------------------


def _modules(mods=ALL_MODULES, layers=2) -> list[str]:
    return sorted(f"model.layers.{i}.{'self_attn' if m in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{m}"
                  for i in range(layers) for m in mods)


def test_valid_adapter_spec(make_adapter, tiny_base):
    folder = make_adapter(r=4)  # written by safetensors' own save_file
    expected = AdapterSpec(rank=4, alpha=8.0, target_modules=list(ALL_MODULES), use_rslora=False, use_dora=False,
                           base_model_name_or_path="tiny-llama", modules=_modules(), num_params=8192, dtype="F32")
    # per layer: r * (in + out) = 4 * (128 + 96 + 96 + 128 + 192 + 192 + 192) = 4096
    assert validate_adapter(folder) == expected
    assert validate_adapter(folder, tiny_base) == expected


def test_small_corpus_adapter_is_valid(tmp_path, tiny_base):
    """The base every malformed case starts from is itself valid: each case breaks exactly one thing."""
    adapter(tmp_path / "a")
    spec = validate_adapter(tmp_path / "a", tiny_base)
    assert (spec.rank, spec.modules, spec.num_params, spec.dtype) == (4, [M0, M1], 2 * 2 * 4 * 64, "F32")


def test_rank_pattern_and_alpha_pattern(tmp_path, tiny_base):
    t = lora_tensors(TINY_BASE_CONFIG, 4)
    for layer in (0, 1):
        t.update(pair(f"model.layers.{layer}.self_attn.q_proj", 8, 64, 64, seed=layer))
    t.update(pair("model.layers.1.mlp.down_proj", 2, 128, 64))
    conf = adapter_config(4, rank_pattern={"q_proj": 8, "model.layers.1.mlp.down_proj": 2}, alpha_pattern={"q_proj": 16})
    adapter(tmp_path / "a", config=conf, tensors=t)
    spec = validate_adapter(tmp_path / "a", tiny_base)
    assert spec.rank == 4 and spec.modules == _modules()
    assert spec.rank_pattern == {"q_proj": 8, "model.layers.1.mlp.down_proj": 2}
    assert spec.alpha_pattern == {"q_proj": 16.0}
    assert spec.num_params == 8192 + 2 * (8 - 4) * (64 + 64) - (4 - 2) * (128 + 64)  # q_proj r=8, a down_proj r=2


@pytest.mark.parametrize("target_modules, modules", [
    ("all-linear", ALL_MODULES),
    (REGEX_TM, ("q_proj", "v_proj")),
    (r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj", ("gate_proj", "up_proj", "down_proj")),
    (["self_attn.q_proj", "v_proj"], ("q_proj", "v_proj")),  # list entries match a dotted suffix
], ids=["all-linear", "regex-attn", "regex-mlp", "suffix-list"])
def test_target_modules_forms(tmp_path, tiny_base, target_modules, modules):
    adapter(tmp_path / "a", config=adapter_config(4, modules, target_modules=target_modules),
            tensors=lora_tensors(TINY_BASE_CONFIG, 4, modules))
    spec = validate_adapter(tmp_path / "a", tiny_base)
    assert spec.target_modules == target_modules and spec.modules == _modules(modules)


def test_bf16_and_f16_adapters_pass(tmp_path, tiny_base):
    t = lora_tensors(TINY_BASE_CONFIG, 4)
    adapter(tmp_path / "bf16", config=adapter_config(4), tensors={k: bf16(v) for k, v in t.items()})
    spec = validate_adapter(tmp_path / "bf16", tiny_base)
    assert (spec.dtype, spec.num_params, spec.modules) == ("BF16", 8192, _modules())
    half = {k: v.astype(np.float16) for k, v in t.items()}
    half[A0] = bf16(t[A0])  # mixed dtypes are listed, sorted
    adapter(tmp_path / "mixed", config=adapter_config(4), tensors=half)
    assert validate_adapter(tmp_path / "mixed", tiny_base).dtype == "BF16,F16"


def test_dora_and_keys_without_prefix_pass(tmp_path, tiny_base):
    t = {k.removeprefix("base_model.model.").removesuffix(".weight"): v for k, v in small_tensors().items()}
    t[f"{M0}.lora_magnitude_vector"] = np.ones(64, np.float32)
    t[f"{Q1}.lora_magnitude_vector.weight"] = np.ones((1, 64), np.float32)
    adapter(tmp_path / "a", config=cfg(use_dora=True), tensors=t)
    spec = validate_adapter(tmp_path / "a", tiny_base)
    assert spec.use_dora and spec.modules == [M0, M1] and spec.num_params == 1024 + 128


# ---- the registry refuses them all, storing nothing ---------------------------------------------------


@pytest.fixture(scope="module", params=["file", "s3"])
def corpus_registry(request, tmp_path_factory) -> AdapterRegistry:
    """One registry per backend shared by the corpus cases below (the ``registry`` fixture makes a bucket and
    two boto3 clients per test, ~0.2 s each; a case here costs one validation and three listings)."""
    if request.param == "file":
        return AdapterRegistry(str(tmp_path_factory.mktemp("corpus-registry")))
    seaweed = request.getfixturevalue("seaweed")
    bucket = seaweed.make_bucket(f"corpus-{uuid.uuid4().hex[:12]}")
    return AdapterRegistry(S3Storage(bucket, "registry", endpoint_url=seaweed.endpoint,
                                     access_key=ACCESS_KEY, secret_key=SECRET_KEY))


@pytest.mark.parametrize("case", _params(CASES))
def test_push_refuses_malformed_adapter_and_stores_nothing(case: Case, corpus_registry, tmp_path, base_dir):
    registry = corpus_registry
    leaked = registry.storage.list("")
    if leaked:
        pytest.fail(f"an earlier corpus case left keys in the shared registry: {leaked}")
    folder = tmp_path / "adapter"
    case.build(folder)
    reg = AdapterRegistry(registry.storage, limits=case.limits)
    with pytest.raises(InvalidAdapterError) as info:
        reg.push(folder, "bad", base_model=str(base_dir) if case.base else None)
    assert type(info.value) is case.error
    assert str(info.value) == case.expected(folder)
    assert registry.names() == []
    assert registry.version_numbers("bad") == []
    assert registry.storage.list("") == []  # not even a claimed version number


def test_failed_pushes_claim_no_version_number(registry, tmp_path, make_adapter):
    for case in [c for c in CASES if c.id in ("truncated-data", "nan-bfloat16", "rank-mismatch-config-vs-tensors")]:
        case.build(tmp_path / case.id)
        with pytest.raises(InvalidAdapterError):
            registry.push(tmp_path / case.id, "bad")
    res = registry.push(make_adapter(), "bad")
    assert res.created and res.manifest.version == 1
    assert registry.names() == ["bad"] and registry.version_numbers("bad") == [1]


BAD_NAMES = ["../x", "a/b", "A", "", "-x", "x" * 64, "a..b", "name with space"]


def test_push_refuses_bad_names_before_storing_anything(registry, tmp_path):
    folder = write_adapter(tmp_path / "good")
    for name in BAD_NAMES:
        message = (f"invalid adapter name {name!r}: use 1-63 characters from a-z 0-9 . _ - starting with a letter "
                   "or digit, no '..'")
        with pytest.raises(InvalidNameError) as info:
            registry.push(folder, name)
        assert str(info.value) == message
        with pytest.raises(InvalidNameError):  # checked before the folder is even looked at
            registry.push(tmp_path / "does-not-exist", name)
    assert registry.names() == []
    assert registry.storage.list("") == []
    assert registry.push(folder, "x" * 63).manifest.version == 1  # the longest valid name


# ---- import hygiene --------------------------------------------------------------------------------------


def test_core_package_imports_neither_torch_nor_boto3():
    code = "import loraplex.adapters, loraplex.cli, sys; assert 'torch' not in sys.modules and 'boto3' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
