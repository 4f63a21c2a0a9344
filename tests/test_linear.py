"""PackedLinear: the oneDNN-prepacked CPU path gives exactly what F.linear gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.model.linear import PackedLinear


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 32, 300])
def test_packed_matches_f_linear(dtype, bias, rows):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 64, generator=gen).to(dtype)
    b = torch.randn(96, generator=gen).to(dtype) if bias else None
    x = torch.randn(rows, 64, generator=gen).to(dtype)
    lin = PackedLinear(w, b)
    if torch.backends.mkldnn.is_available():
        assert lin.packed is not None and lin.nbytes == w.nbytes
    torch.testing.assert_close(lin(x), F.linear(x, w, b), rtol=0, atol=0)
    torch.testing.assert_close(lin(x.view(1, rows, 64)), F.linear(x, w, b).view(1, rows, 96), rtol=0, atol=0)


def test_fp32_and_mismatched_inputs_stay_on_f_linear():
    w = torch.randn(8, 4)
    lin = PackedLinear(w)
    assert lin.packed is None and lin.nbytes == 0
    x = torch.randn(3, 4)
    assert torch.equal(lin(x), F.linear(x, w))
    half = PackedLinear(w.bfloat16())
    xf = torch.randn(3, 4)  # an fp32 input to a bf16 weight: the dense path raises as F.linear would
    with pytest.raises(RuntimeError):
        half(xf)
