"""An adapter's weights in memory, keyed by (layer, projection), loaded from a PEFT folder.

PEFT keys such as ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`` become
``ModuleKey(3, "q_proj")``. The scale folds alpha, rank and rsLoRA together, so the delta of one
module is always ``scale * (x @ a.T) @ b.T``.
"""

from __future__ import annotations

import hashlib

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.adapters.errors import InvalidAdapterError
from loraplex.adapters.spec import CONFIG_FILE, WEIGHTS_FILE, parse_config, pattern_value, Limits

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.*?layers\.(?P<layer>\d+)\.(?:[a-z_]+\.)?(?P<proj>[a-z_]+))\.lora_(?P<ab>[AB])\.weight$")


@dataclass(frozen=True, slots=True, order=True)
class ModuleKey:
    layer: int
    proj: str  # one of PROJECTIONS

    def __str__(self) -> str:
        return f"layers.{self.layer}.{self.proj}"


@dataclass(frozen=True, slots=True)
class LoraModule:
    a: torch.Tensor  # [r, in_features]
    b: torch.Tensor  # [out_features, r]
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta_weight(self) -> torch.Tensor:
        """The dense update this module adds to the base weight: scale * B @ A, [out, in]."""
        return self.scale * (self.b.float() @ self.a.float())


@dataclass(frozen=True, slots=True)
class LoraWeights:
    name: str  # e.g. "support-bot@3"; unique per distinct adapter in the engine
    modules: dict[ModuleKey, LoraModule]

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LoraWeights:
        return LoraWeights(self.name, {k: LoraModule(m.a.to(device, dtype), m.b.to(device, dtype), m.scale)
                                       for k, m in self.modules.items()})

    @property
    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes for m in self.modules.values())

    def digest(self) -> bytes:
        """A content digest of what this adapter computes (modules, scales, A and B as stored): the identity its
        cached KV blocks are kept under (``server.engine.block_pool``). The name is not part of it."""
        h = hashlib.blake2b(b"loraplex:lora-weights", digest_size=16)
        for key in sorted(self.modules, key=lambda k: (k.layer, k.proj)):
            m = self.modules[key]
            h.update(f"{key.layer}.{key.proj}:{m.scale!r}:{m.a.dtype}:{tuple(m.a.shape)}:{tuple(m.b.shape)};".encode())
            for t in (m.a, m.b):
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.digest()

    @classmethod
    def load(cls, folder: str | Path, name: str, dtype: torch.dtype = torch.float32) -> LoraWeights:
        """Load a PEFT LoRA folder (already validated by ``adapters.spec.validate_adapter``)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        conf = parse_config(json.loads((folder / CONFIG_FILE).read_text()), Limits())
        if conf["use_dora"]:
            raise InvalidAdapterError(f"adapter {name}: DoRA adapters (use_dora) are not served yet; merge or retrain as LoRA")
        tensors = load_file(str(folder / WEIGHTS_FILE))
        parts: dict[ModuleKey, dict[str, torch.Tensor]] = {}
        paths: dict[ModuleKey, str] = {}
        for key, t in tensors.items():
            m = _KEY.match(key)
            if not m or m["proj"] not in PROJECTIONS:
                raise InvalidAdapterError(f"adapter {name}: tensor {key!r} is not a LoRA weight of a decoder projection")
            mk = ModuleKey(int(m["layer"]), m["proj"])
            parts.setdefault(mk, {})[m["ab"]] = t.to(dtype)
            paths[mk] = m["path"]
        modules = {}
        for mk, ab in parts.items():
            r = ab["A"].shape[0]
            alpha = pattern_value(conf["alpha_pattern"], paths[mk], conf["alpha"])
            scale = alpha / math.sqrt(r) if conf["use_rslora"] else alpha / r
            modules[mk] = LoraModule(ab["A"].contiguous(), ab["B"].contiguous(), scale)
        if not modules:
            raise InvalidAdapterError(f"adapter {name} holds no LoRA modules")
        return cls(name, dict(sorted(modules.items())))
