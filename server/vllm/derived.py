"""Derived adapters as PEFT folders on disk: what vLLM loads for mixtures and merges.

vLLM serves one adapter per request, from a folder. A weighted mixture or a merge is computed once with
``server.lora.merge`` (PEFT ``add_weighted_adapter`` math: ``cat`` for mixtures, exact) and written here
as a PEFT LoRA folder named after the hash of its inputs, so asking again reuses it. A folder is
written under a temporary name and renamed: present and complete, or absent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from loraplex.adapters.spec import CONFIG_FILE, WEIGHTS_FILE

from ..lora.weights import LoraWeights

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def peft_key(layer: int, proj: str, ab: str) -> str:
    part = "self_attn" if proj in _ATTN else "mlp"
    return f"base_model.model.model.layers.{layer}.{part}.{proj}.lora_{ab}.weight"


def write_peft(weights: LoraWeights, folder: Path, base_model: str | None = None) -> Path:
    """Save ``weights`` as a PEFT LoRA folder with one rank ``R`` (the largest module rank) and scale 1.

    Each module's scale is folded into its A, and modules of smaller rank are zero-padded to ``R`` (as
    PEFT pads a ``cat`` merge): zero rows and columns add nothing, so every module's delta is unchanged.
    """
    big_r = weights.rank
    tensors: dict[str, torch.Tensor] = {}
    for key, m in weights.modules.items():
        r = m.rank
        a = torch.zeros(big_r, m.a.shape[1], dtype=torch.float32)  # [R, in]
        b = torch.zeros(m.b.shape[0], big_r, dtype=torch.float32)  # [out, R]
        a[:r] = m.a.float() * m.scale
        b[:, :r] = m.b.float()
        tensors[peft_key(key.layer, key.proj, "A")] = a.contiguous()
        tensors[peft_key(key.layer, key.proj, "B")] = b.contiguous()
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": big_r, "lora_alpha": big_r, "use_rslora": False,
              "use_dora": False, "lora_dropout": 0.0, "bias": "none",
              "target_modules": sorted({k.proj for k in weights.modules}), "base_model_name_or_path": base_model}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    return folder


class DerivedStore:
    """Derived adapter folders under ``root``, one per name (``mix-<hash>`` / ``merge-<hash>``)."""

    def __init__(self, root: Path, base_model: str | None = None) -> None:
        self.root = Path(root)
        self.base_model = base_model
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def folder(self, name: str, build: Callable[[], LoraWeights]) -> Path:
        """The folder of ``name``, built with ``build()`` the first time (once, even when asked concurrently)."""
        target = self.root / name
        if (target / CONFIG_FILE).is_file():
            return target
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            if (target / CONFIG_FILE).is_file():
                return target
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.root))
            try:
                write_peft(build(), tmp, self.base_model)
                tmp.chmod(0o755)
                try:
                    os.replace(tmp, target)
                except OSError:  # another process made it first
                    if not (target / CONFIG_FILE).is_file():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return target
