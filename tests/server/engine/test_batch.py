"""build_step as a table: one step's work (tokens, first position, block table, adapters, wants logits) in, the
batch's row layout out: decodes first, grouped by adapter slot (base first), prefill chunks after; which rows
give logits; where each token's keys and values go; the decodes' block tables (padded with the null block) and
mask."""

from __future__ import annotations

import pytest
import torch

from loraplex.server.engine.batch import Work, build_step

RANKS = {0: 4, 1: 8}
BS = 4  # tokens per block
W = Work

CASES = {
    # name: (work, ids, slot mapping, decode tables, decode context lengths (None: no mask), logit rows, sampled
    #        work indices, prefills as (start, length, first_pos, table or None))
    "one prefill": ([W([5, 6, 7], 0, [3], [], True)], [5, 6, 7], [12, 13, 14], [], None, [2], [0],
                    [(0, 3, 0, None)]),
    "a non-final prefill chunk gives no logits": ([W([5, 6], 0, [2], [], False)], [5, 6], [8, 9], [], None, [], [],
                                                   [(0, 2, 0, None)]),
    "decodes first, by adapter (base first); tables padded with the null block": (
        [W([9], 4, [1, 2], [(1, 1.0)], True), W([8], 3, [5], [], True), W([7, 7], 0, [6], [], True)],
        [8, 9, 7, 7], [23, 8, 24, 25], [[5, 0], [1, 2]], [4, 5], [0, 1, 3], [1, 0, 2], [(2, 2, 0, None)]),
    "full blocks: no mask": (
        [W([1], 3, [1], [], True), W([2], 7, [2, 3], [], True)], [1, 2], [7, 15], [[1, 0], [2, 3]], [4, 8],
        [0, 1], [0, 1], []),
    "equal lengths that fill their blocks: no mask at all": (
        [W([1], 3, [1], [], True), W([2], 3, [2], [], True)], [1, 2], [7, 11], [[1], [2]], None, [0, 1], [0, 1], []),
    "a chunk past position 0 is a prefill over its blocks so far": (
        [W([4, 4], 6, [1, 2, 9], [], True)], [4, 4], [10, 11], [], None, [1], [0], [(0, 2, 6, [[1, 2]])]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_step_layout(name):
    work, ids, mapping, tables, lens, logit_rows, sampled, prefills = CASES[name]
    batch, rows, _ = build_step(work, RANKS, torch.float32, "cpu", BS)
    assert batch.input_ids.tolist() == ids and batch.slot_mapping.tolist() == mapping
    assert batch.num_decode == len(tables) and batch.decode_tables.tolist() == tables
    if lens is None:
        assert batch.decode_mask is None
    else:
        assert batch.decode_mask.view(len(lens), -1).sum(1).tolist() == lens  # the first `len` positions, per row
    assert batch.logit_rows.tolist() == logit_rows and rows == sampled
    got = [(c.start, c.length, c.first_pos, None if c.table is None else c.table.tolist()) for c in batch.prefills]
    assert got == prefills
    assert len(batch.positions) == len(ids)


def test_lora_rows_follow_the_layout():
    work = [W([9], 4, [1, 2], [(1, 1.0)], True), W([8], 3, [3], [(0, 1.0)], True)]
    batch, _, _ = build_step(work, RANKS, torch.float32, "cpu", BS)
    assert batch.input_ids.tolist() == [8, 9] and batch.positions.tolist() == [3, 4]  # slot 0's decode first
    assert batch.lora.slots.tolist() == [0, 1] and batch.lora.gather is None and batch.lora.rank == 8
