"""The NF4 kernel against bitsandbytes: the weights it decodes are ``dequantize_4bit``'s float32 values bit for bit
(double-quantized absmax or not); its products match a float64 matmul on those values for every token count: within
``nf4.KERNEL_ERROR`` of the output's scale for the int16 kernel (its tiles of 4 and their remainders), as float32
does for the dequantize-then-matmul path above ``KERNEL_ROWS``; a block of activations with an inf or NaN makes its
own token's outputs NaN and no other's; several
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
def test_products_match_a_float64_matmul_for_every_token_count(tokens):
    members = [linear4(64, 128, seed=1), linear4(32, 128, bias=True, seed=2), linear4(48, 128, seed=3)]
    lin = Nf4Linear.build(members)
    assert lin is not None and lin.out_features == 144
    x = torch.randn(tokens, 128) * torch.logspace(-3, 1, 128)  # blocks of very different scales
    want = torch.cat([F.linear(x.double(), reference(m).double(), None if m.bias is None else m.bias.double())
                      for m in members], dim=-1)
    got = lin(x)
    assert got.shape == (tokens, 144) and got.dtype == torch.float32
    bound = (nf4.KERNEL_ERROR if tokens <= KERNEL_ROWS else 1e-6) * want.abs().amax(-1, keepdim=True)
    assert ((got.double() - want).abs() <= bound).all()
    assert torch.equal(lin(x.view(1, tokens, 128)), got.view(1, tokens, 144))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_activation_spoils_only_its_own_token(bad):
    lin = Nf4Linear.build([linear4(72, 128, seed=4)])
    x = torch.randn(6, 128)
    clean = lin(x)
    x[2, 70] = bad
    got = lin(x)
    assert got[2].isnan().all()
    assert torch.equal(got[[0, 1, 3, 4, 5]], clean[[0, 1, 3, 4, 5]])


def test_blocks_of_zeros_and_of_extreme_scales_keep_the_bound():
    m = linear4(40, 128, seed=5)
    lin = Nf4Linear.build([m])
    x = torch.randn(4, 128)
    x[0] = 0
    x[1, :64] = 0  # one block of zeros, one of normal values
    x[2] *= 1e20
    x[3] *= 1e-30
    got, want = lin(x).double(), F.linear(x.double(), reference(m).double())
    assert torch.equal(got[0], torch.zeros(40, dtype=torch.float64))
    assert ((got - want).abs() <= nf4.KERNEL_ERROR * want.abs().amax(-1, keepdim=True)).all()
