"""The paged decode-attention kernel against SDPA over the gathered blocks: fp32, bf16 and fp16, contexts that end
mid-block, a single position, block tables padded with the null block; it reads only each sequence's own context
(NaN anywhere else in the pool never reaches an output); a block or length out of range is refused; and the engine's greedy decode is the same with it and
with the gather path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraplex.server.model import paged_attention

pytestmark = pytest.mark.skipif(not paged_attention.available("cpu"),
                                reason=f"no C++ toolchain here: {paged_attention.why_not()}")

KV, GROUP, HD, BS = 3, 3, 64, 16


def _case(lens: list[int], dtype: torch.dtype, blocks: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(KV, blocks, BS, HD, generator=g).to(dtype)
    v = torch.randn(KV, blocks, BS, HD, generator=g).to(dtype)
    nb = -(-max(lens) // BS)
    free = torch.randperm(blocks - 1, generator=g) + 1  # block 0 is the null block
    tables, taken = [], 0
    for n in lens:
        own = -(-n // BS)
        tables.append(free[taken:taken + own].tolist() + [0] * (nb - own))
        taken += own
    q = torch.randn(len(lens), KV, GROUP, HD, generator=g).to(dtype)
    return q, k, v, torch.tensor(tables, dtype=torch.long), torch.tensor(lens, dtype=torch.long)


def _reference(q, k, v, tables, lens):
    d, nb = tables.shape
    kk = k.index_select(1, tables.reshape(-1)).view(KV, d, nb * BS, HD).float()
    vv = v.index_select(1, tables.reshape(-1)).view(KV, d, nb * BS, HD).float()
    mask = (torch.arange(nb * BS).unsqueeze(0) < lens.unsqueeze(1)).view(1, d, 1, -1)
    out = F.scaled_dot_product_attention(q.float().transpose(0, 1), kk, vv, attn_mask=mask, scale=HD ** -0.5)
    return out.transpose(0, 1)  # [D, KV, GROUP, HD]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("lens", [[1], [16], [17, 5, 48, 1, 33], [200] * 4 + [3]], ids=["one", "block", "ragged", "long"])
def test_matches_sdpa_over_the_gathered_blocks(dtype, tol, lens):
    q, k, v, tables, lens_t = _case(lens, dtype)
    got = paged_attention.paged_decode(q, k, v, tables, lens_t, HD ** -0.5)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), _reference(q, k, v, tables, lens_t), atol=tol, rtol=tol)


def test_reads_only_each_sequence_s_own_context():
    q, k, v, tables, lens = _case([20, 7, 40], torch.float32)
    want = paged_attention.paged_decode(q, k, v, tables, lens, HD ** -0.5)
    used = torch.zeros(k.shape[1], BS, dtype=torch.bool)
    for row, n in zip(tables.tolist(), lens.tolist()):
        for p in range(n):
            used[row[p // BS], p % BS] = True
    k[:, ~used] = float("nan")  # the rest of the pool: other requests' values, unwritten tails, the null block
    v[:, ~used] = float("inf")
    got = paged_attention.paged_decode(q, k, v, tables, lens, HD ** -0.5)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_a_table_or_length_out_of_range_is_refused_before_any_read():
    q, k, v, tables, lens = _case([20, 7], torch.float32)
    bad_block = tables.clone()
    bad_block[1, 0] = k.shape[1]  # one past the pool
    with pytest.raises(RuntimeError, match="block out of range"):
        paged_attention.paged_decode(q, k, v, bad_block, lens, HD ** -0.5)
    bad_block[1, 0] = -1
    with pytest.raises(RuntimeError, match="block out of range"):
        paged_attention.paged_decode(q, k, v, bad_block, lens, HD ** -0.5)
    with pytest.raises(RuntimeError, match="context length out of range"):
        paged_attention.paged_decode(q, k, v, tables, torch.tensor([20, tables.shape[1] * BS + 1]), HD ** -0.5)
