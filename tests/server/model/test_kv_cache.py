"""KVCache slots: what a sequence wrote is gone when its slot is handed to the next one."""

from __future__ import annotations

import torch

from loraplex.server.model.kv_cache import CacheShape, KVCache


def test_release_zeroes_every_position_the_slot_was_written_at_and_nothing_else():
    cache = KVCache(CacheShape(num_layers=2, num_slots=3, max_len=16, num_kv_heads=2, head_dim=4), torch.float32)
    slots = [cache.allocate() for _ in range(3)]
    assert slots == [0, 1, 2]
    for slot in slots:
        cache.mark(slot, 5)
        cache.mark(slot, 3)  # a mark never lowers the extent
        for layer in range(2):
            pos = torch.arange(5)
            kv = torch.full((5, 2, 4), float("nan"))
            cache.write(layer, torch.full((5,), slot), pos, kv, kv.neg())
    cache.release(1)
    assert cache.k[:, 1].eq(0).all() and cache.v[:, 1].eq(0).all()
    assert cache.k[:, [0, 2], :, :5].isnan().all() and cache.k[:, :, :, 5:].eq(0).all()
    assert cache.allocate() == 1  # lowest first, and clean
    cache.release(1)  # nothing written since: nothing to clear
    assert cache.free_slots == 1
