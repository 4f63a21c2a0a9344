"""Where adapter weights come from: the registry (through its verified local cache) or a folder.

The engine knows adapters by a pinned name (``support-bot@3``, or a folder path for an adapter
that is not in a registry); this turns such a name into validated ``LoraWeights``, refusing an
adapter made for another base model before any tensor is loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from loraplex.adapters import AdapterRegistry, BaseModelInfo, validate_adapter
from loraplex.adapters.errors import NotFoundError

from .weights import LoraWeights


def is_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~"))


class AdapterSource:
    def __init__(self, registry: AdapterRegistry | None, base: BaseModelInfo | None, dtype: torch.dtype = torch.float32) -> None:
        self.registry = registry
        self.base = base
        self.dtype = dtype

    def __call__(self, name: str) -> LoraWeights:
        if is_path(name):
            folder = Path(name).expanduser()
            validate_adapter(folder, self.base)
            return LoraWeights.load(folder, name, self.dtype)
        if self.registry is None:
            raise NotFoundError(f"adapter {name!r} not found: no registry configured")
        manifest, folder = self.registry.fetch(name)
        if self.base is not None:
            self.registry.check_base(manifest, self.base)
            if manifest.base_fingerprint is None:  # the cache validated it, but not against a base
                validate_adapter(folder, self.base)
        return LoraWeights.load(folder, manifest.ref, self.dtype)
