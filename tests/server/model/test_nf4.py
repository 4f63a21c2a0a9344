"""The NF4 kernel against bitsandbytes: the weights it decodes are ``dequantize_4bit``'s float32 values bit for bit
(double-quantized absmax or not); its products match a dense float32 matmul on those values for every token count
(the kernel's tiles of 4 and their remainders, and the dequantize-then-matmul path above ``KERNEL_ROWS``); several
members with biases run as one; and a linear the kernel cannot take (in_features not a multiple of 64, int8) is
left to bitsandbytes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraplex.server.model import nf4
from loraplex.server.model.nf4 import KERNEL_ROWS, Nf4Linear

pytestmark = pytest.mark.skipif(not nf4.available(), reason=f"no NF4 kernel here: {nf4.why_not()}")


def linear4(out_f: int, in_f: int, bias: bool = False, nested: bool = True, seed: int = 0):
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    dense = torch.nn.Linear(in_f, out_f, bias=bias)
    m = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=torch.float32, compress_statistics=nested,
                          quant_type="nf4")
    m.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, compress_statistics=nested,
                                 quant_type="nf4")
    if bias:
        m.bias = torch.nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    m.weight = m.weight._quantize("cpu")  # [out * in / 2, 1] u8 and its quant_state
    return m


def reference(m) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state).float()


@pytest.mark.parametrize("nested", [True, False])
def test_the_decoded_weights_are_bitsandbytes_float32_values_bit_for_bit(nested):
    m = linear4(96, 192, nested=nested)
    lin = Nf4Linear.build([m])
    assert lin is not None
    assert torch.equal(lin.dequantized(), reference(m))


@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 7, 8, 13, KERNEL_ROWS, KERNEL_ROWS + 1, 64])
def test_products_match_a_dense_float32_matmul_for_every_token_count(tokens):
    members = [linear4(64, 128, seed=1), linear4(32, 128, bias=True, seed=2), linear4(48, 128, seed=3)]
    lin = Nf4Linear.build(members)
    assert lin is not None and lin.out_features == 144
    x = torch.randn(tokens, 128)
    want = torch.cat([F.linear(x, reference(m), m.bias) for m in members], dim=-1)
    got = lin(x)
    assert got.shape == (tokens, 144) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin(x.view(1, tokens, 128)), want.view(1, tokens, 144), rtol=1e-5, atol=1e-5)


def test_linears_the_kernel_cannot_take_are_left_to_bitsandbytes():
    assert Nf4Linear.build([linear4(64, 96)]) is None  # in_features not a multiple of the 64-weight block
    assert Nf4Linear.build([torch.nn.Linear(64, 64)]) is None  # not quantized
    assert Nf4Linear.build([]) is None
