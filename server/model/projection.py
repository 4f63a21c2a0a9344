"""Linears that read the same input (q/k/v; gate/up), run as one matmul when they can be.

Plain ``nn.Linear`` members are fused into one weight ``[sum(out), in]``; the members' own weights
become views of it, so nothing is stored twice and the transformers model stays usable (until
``release_dense``, for an engine that owns its model and runs the oneDNN-packed copy instead).
Quantized members (bitsandbytes) are run one by one.
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import PackedLinear


class Projection:
    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.sizes = [m.out_features for m in modules]
        self.in_features = modules[0].in_features
        self.fused: nn.Linear | None = None
        self.dense: PackedLinear | None = None  # the plain linear (fused or single), packed for the CPU
        if len(modules) > 1 and all(type(m) is nn.Linear for m in modules):
            self._fuse()
        self.one_output = self.fused is not None  # __call__ gives one [T, sum(out)] tensor for several members
        if self.fused is not None or (len(modules) == 1 and type(modules[0]) is nn.Linear):
            lin = self.fused or modules[0]
            self.dense = PackedLinear(lin.weight, lin.bias)

    def release_dense(self) -> None:
        """Free the dense weights the packed copy replaces: the members' weights become empty, so the
        transformers modules fail loudly if called (shape mismatch) instead of computing with stale data."""
        if self.dense is None or not self.dense.release_dense():
            return
        for m in self.modules:
            m.weight = nn.Parameter(torch.empty(0, dtype=self.dense.dtype, device=self.dense.packed.device),
                                    requires_grad=False)
        self.fused = None

    def _fuse(self) -> None:
        ws = [m.weight for m in self.modules]
        has_bias = any(m.bias is not None for m in self.modules)
        fused = nn.Linear(self.in_features, sum(self.sizes), bias=has_bias, device=ws[0].device, dtype=ws[0].dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat(ws))
            if has_bias:
                fused.bias.copy_(torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=ws[0].dtype,
                                                                                          device=ws[0].device)
                                            for m in self.modules]))
        fused.requires_grad_(False)
        off = 0
        for m, n in zip(self.modules, self.sizes):  # members now view the fused storage
            m.weight = nn.Parameter(fused.weight[off:off + n], requires_grad=False)
            if m.bias is not None:
                m.bias = nn.Parameter(fused.bias[off:off + n], requires_grad=False)
            off += n
        self.fused = fused

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[T, sum(out)] as one tensor when fused, else one [T, out] per member."""
        if self.dense is not None:
            return [self.dense(x)]
        return [m(x) for m in self.modules]

    def split(self, ys: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(ys[0].split(self.sizes, dim=-1)) if self.one_output else ys
