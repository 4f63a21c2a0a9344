"""The paged KVCache: blocks handed out lowest first and zeroed, so what a sequence wrote never reaches the next
one; writes land at block * block_size + offset; a gather returns each table's blocks in order; the null block
stays zero; the pool's bytes follow the budget."""

from __future__ import annotations

import pytest
import torch

from loraplex.server.engine.block_pool import BlockPool
from loraplex.server.model.kv_cache import NULL_BLOCK, CacheShape, KVCache

SHAPE = CacheShape(num_layers=2, num_blocks=5, block_size=4, num_kv_heads=2, head_dim=3)


def test_blocks_are_handed_out_lowest_first_and_zeroed():
    cache = BlockPool(KVCache(SHAPE, torch.float32))
    assert cache.total_blocks == 4 and cache.free_blocks == 4
    a = cache.allocate(2)
    assert a == [1, 2]
    cache.cache.k[:, :, a] = float("nan")  # what a hostile sequence might leave
    cache.cache.v[:, :, a] = float("inf")
    cache.free(a)
    assert cache.allocate(5) is None and cache.free_blocks == 4  # too many: nothing taken
    b = cache.allocate(3)
    assert b == [1, 2, 3]
    kv = cache.cache
    assert kv.k[:, :, b].eq(0).all() and kv.v[:, :, b].eq(0).all()
    assert kv.k[:, :, NULL_BLOCK].eq(0).all() and cache.used_blocks == 3
    with pytest.raises(ValueError):
        KVCache(CacheShape(1, 1, 4, 1, 1), torch.float32)


def test_writes_and_gathers_follow_the_block_tables():
    cache = KVCache(SHAPE, torch.float32)
    first, second = [1, 2], [3]
    for b in first + second:  # as BlockPool.allocate hands them out
        cache.zero(b)
    # sequence one: 6 tokens (positions 0..5) in blocks 1, 2; sequence two: 3 tokens in block 3
    pos1, pos2 = torch.arange(6), torch.arange(3)
    mapping = torch.cat([torch.tensor(first)[pos1 // 4] * 4 + pos1 % 4, torch.tensor(second)[pos2 // 4] * 4 + pos2 % 4])
    k = torch.randn(9, 2, 3)
    v = torch.randn(9, 2, 3)
    for layer in range(2):
        cache.write(layer, mapping, k * (layer + 1), v * (layer + 1))
    tables = torch.tensor([first, second + [NULL_BLOCK]])  # padded with the null block
    gk, gv = cache.gather(1, tables)
    assert gk.shape == (2, 2, 8, 3) and gk.is_contiguous()  # [kv, B, L, hd]
    gk, gv = gk.transpose(0, 1), gv.transpose(0, 1)  # [B, kv, L, hd]
    torch.testing.assert_close(gk[0, :, :6], (k[:6] * 2).transpose(0, 1))
    torch.testing.assert_close(gv[1, :, :3], (v[6:] * 2).transpose(0, 1))
    assert gk[0, :, 6:].eq(0).all() and gk[1, :, 3:].eq(0).all()  # unwritten tails and the null block: zeros


def test_the_budget_sizes_the_pool():
    n = CacheShape.blocks_for(1 << 20, num_layers=2, num_kv_heads=2, head_dim=4, block_size=16, dtype=torch.bfloat16)
    assert n == (1 << 20) // (2 * 2 * 2 * 4 * 16 * 2)
    cache = KVCache(CacheShape(2, n, 16, 2, 4), torch.bfloat16)
    assert cache.nbytes <= 1 << 20 and cache.block_nbytes == 2 * 2 * 2 * 4 * 16 * 2
