"""Linears that read the same input (q/k/v; gate/up), run as one matmul when they can be.

Plain ``nn.Linear`` members are fused into one weight ``[sum(out), in]``; the members' own weights
become views of it, so nothing is stored twice and the transformers model stays usable (until
``release_dense``, for an engine that owns its model and runs the oneDNN-packed copy instead).
NF4 members (bitsandbytes 4-bit) computed in float32 on a CPU with AVX2 run as one call of our NF4 kernel
(``Nf4Linear``: their codes concatenated); other quantized members are run one by one.
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import PackedLinear
from .nf4 import Nf4Linear


class Projection:
    def __init__(self, modules: list[nn.Module], dtype: torch.dtype = torch.float32) -> None:
        self.modules = modules
        self.sizes = [m.out_features for m in modules]
        self.in_features = modules[0].in_features
        self.fused: nn.Linear | None = None
        # every member in one call: the NF4 kernel (float32 on CPU), or the plain linear (fused or single) packed
        # for the CPU; None: members one by one
        self.dense: PackedLinear | Nf4Linear | None = Nf4Linear.build(modules) if dtype == torch.float32 else None
        if self.dense is None and len(modules) > 1 and all(type(m) is nn.Linear for m in modules):
            self._fuse()
        if self.fused is not None or (len(modules) == 1 and type(modules[0]) is nn.Linear):
            lin = self.fused or modules[0]
            self.dense = PackedLinear(lin.weight, lin.bias)
        self.one_output = self.dense is not None and len(modules) > 1  # one [T, sum(out)] tensor for all members

    def release_dense(self) -> None:
        """Free the members' weights the packed copy (or the NF4 kernel's codes) replaces: they become empty, so the
        transformers modules fail loudly if called (shape mismatch) instead of computing with stale data."""
        if self.dense is None or not self.dense.release_dense():
            return
        for m in self.modules:
            m.weight = nn.Parameter(torch.empty(0, dtype=m.weight.dtype, device=m.weight.device), requires_grad=False)
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
