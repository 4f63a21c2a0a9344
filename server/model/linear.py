"""A dense linear whose weight is laid out once for the CPU's matmul kernels (oneDNN prepacking).

On CPU, ``F.linear`` on a plain bf16/fp16 weight reorders it into oneDNN's blocked layout on every
call. Packing it once (what PyTorch's inductor does for frozen CPU graphs) gives the same numbers
faster: measured on the 2-core dev machine (AVX512-BF16, 2026-11-23), bf16, 32 tokens: the 120 base
linears of SmolLM2-135M 19.8 -> 13.6 ms, its 49k-vocabulary LM head 4.8 -> 1.75 ms, bit-identical
outputs. Anything else (CUDA, fp32, quantized modules, a build without oneDNN, a CPU without AVX-512 or
AVX-NE-CONVERT, where oneDNN refuses to pack) runs ``F.linear``.
The packed copy sits beside the dense weight, which the transformers modules keep using, unless the
engine owns the model (``Engine(owns_model=True)``, as ``build_engine`` and the server do): then the
dense weights of the packed projections are released and the transformers model is no longer callable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_PACKABLE = (torch.bfloat16, torch.float16)


def cpu_packs(dtype: torch.dtype) -> bool:
    """Whether this CPU and build can prepack ``dtype`` weights. oneDNN needs AVX-512 (BW/VL/DQ for bf16, FP16 for
    fp16) or AVX-NE-CONVERT; on an AVX2-only CPU (e.g. AMD EPYC) it refuses both and F.linear runs instead."""
    if dtype not in _PACKABLE or not torch.backends.mkldnn.is_available():
        return False
    mkldnn = torch.ops.mkldnn
    if not (hasattr(mkldnn, "_reorder_linear_weight") and hasattr(mkldnn, "_linear_pointwise")):
        return False
    check = mkldnn._is_mkldnn_bf16_supported if dtype == torch.bfloat16 else mkldnn._is_mkldnn_fp16_supported
    return bool(check())


def _can_pack(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and cpu_packs(weight.dtype)


class PackedLinear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight: torch.Tensor | None = weight.detach()  # [out, in]; None once released
        self.bias = None if bias is None else bias.detach()  # [out]
        self.dtype = weight.dtype
        self.packed: torch.Tensor | None = None  # [out, in] in oneDNN's opaque blocked layout
        self.nbytes = 0  # bytes of the packed copy (0 when not packed)
        if _can_pack(self.weight):
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 32)
                self.nbytes = weight.nbytes
            except RuntimeError:  # an op this build cannot run: stay on F.linear
                self.packed = None

    def release_dense(self) -> bool:
        """Drop this object's reference to the dense weight when the packed copy replaces it."""
        if self.packed is None:
            return False
        self.weight = None
        return True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]"""
        if self.packed is not None and x.dtype == self.dtype:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if self.weight is None:
            raise ValueError(f"input of dtype {x.dtype} for a linear packed as {self.dtype}")
        return F.linear(x, self.weight, self.bias)
