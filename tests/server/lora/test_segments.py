"""LoraBatch.build as a table (in the style of LoRAX's find_segments test): rows in, segments out.

A row is (first token, token count, [(bank slot, weight), ...]) of one sequence in the step. Each case names the
segment slots, the padded length L, the gather (None when the segments are the step's rows in order), the
per-row weights (None when all are 1), the first slot of a contiguous slot range and the dense start row.
"""

from __future__ import annotations

import pytest
import torch

from loraplex.server.lora.bank import LoraBatch

RANKS = {0: 4, 1: 8, 2: 16, 3: 4}

CASES = {
    # name: (rows, slots, L, gather, weights, first_slot, dense_start, rank)
    "one adapter, one sequence": ([(0, 4, [(0, 1.0)])], [0], 4, None, None, 0, 0, 4),
    "base rows before it": ([(2, 3, [(1, 1.0)])], [1], 3, None, None, 1, 2, 8),
    "two adapters in slot order, equal": ([(0, 2, [(0, 1.0)]), (2, 2, [(1, 1.0)])], [0, 1], 2, None, None, 0, 0, 8),
    "decodes of two adapters": ([(0, 1, [(2, 1.0)]), (1, 1, [(3, 1.0)])], [2, 3], 1, None, None, 2, 0, 16),
    # a pad repeats its own segment's first row with weight 0, never another request's row (0 * inf = NaN)
    "a short segment is padded with its own first row": ([(0, 3, [(0, 1.0)]), (3, 1, [(2, 1.0)])], [0, 2], 3,
                                                         [0, 1, 2, 3, 3, 3], [1, 1, 1, 1, 0, 0], None, 0, 16),
    "a pad never reads row 0 of another request": ([(0, 2, [(0, 1.0)]), (2, 1, [(1, 1.0)])], [0, 1], 2,
                                                   [0, 1, 2, 2], [1, 1, 1, 0], 0, 0, 8),
    "rows out of slot order": ([(0, 2, [(1, 1.0)]), (2, 2, [(0, 1.0)])], [0, 1], 2, [2, 3, 0, 1], None, 0, 0, 8),
    "a mixture repeats its rows": ([(0, 2, [(0, 0.25), (1, 0.75)])], [0, 1], 2, [0, 1, 0, 1],
                                   [0.25, 0.25, 0.75, 0.75], 0, 0, 8),
    "a mixture beside a longer segment": ([(0, 1, [(0, 0.5), (1, 0.5)]), (1, 3, [(2, 1.0)])], [0, 1, 2], 3,
                                          [0, 0, 0, 0, 0, 0, 1, 2, 3], [0.5, 0, 0, 0.5, 0, 0, 1, 1, 1], 0, 0, 16),
    "same slot from two sequences": ([(0, 1, [(1, 1.0)]), (1, 1, [(1, 1.0)])], [1], 2, None, None, 1, 0, 8),
    "a weighted single adapter keeps its weight": ([(0, 2, [(3, 0.5)])], [3], 2, None, [0.5, 0.5], 3, 0, 4),
}


@pytest.mark.parametrize("name", list(CASES))
def test_segments(name):
    rows, slots, seg_len, gather, weights, first_slot, dense_start, rank = CASES[name]
    b = LoraBatch.build(rows, RANKS, torch.float32, "cpu")
    assert b.slots.tolist() == slots
    assert b.seg_len == seg_len
    assert (None if b.gather is None else b.gather.tolist()) == gather
    assert (None if b.weights is None else b.weights.squeeze(1).tolist()) == weights
    assert b.first_slot == first_slot and b.dense_start == dense_start and b.rank == rank
    assert len(slots) * seg_len == (len(gather) if gather is not None else len(slots) * seg_len)


def test_no_lora_rows_is_no_batch():
    assert LoraBatch.build([], RANKS, torch.float32, "cpu") is None
    assert LoraBatch.build([(0, 3, [])], RANKS, torch.float32, "cpu") is None
