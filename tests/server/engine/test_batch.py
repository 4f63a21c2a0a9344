"""build_step as a table: one step's work (tokens, first position, KV slot, adapters, wants logits) in, the
batch's row layout out: decodes first, grouped by adapter slot (base first), prefill chunks after; which rows
give logits; the decode slots in cache order; whether the cache is read through a view."""

from __future__ import annotations

import pytest
import torch

from loraplex.server.engine.batch import Work, build_step

RANKS = {0: 4, 1: 8}
W = Work

CASES = {
    # name: (work, ids, decode count, decode slots, logit rows, sampled work indices, first slot, mask?, prefills)
    "one prefill": ([W([5, 6, 7], 0, 0, [], True)], [5, 6, 7], 0, [], [2], [0], None, False, [(0, 3, 0, 0)]),
    "a non-final prefill chunk gives no logits": ([W([5, 6], 0, 0, [], False)], [5, 6], 0, [], [], [], None, False,
                                                   [(0, 2, 0, 0)]),
    "decodes first, by adapter (base first)": (
        [W([9], 4, 2, [(1, 1.0)], True), W([8], 3, 1, [], True), W([7, 7], 0, 0, [], True)],
        [8, 9, 7, 7], 2, [1, 2], [0, 1, 3], [1, 0, 2], 1, True, [(2, 2, 0, 0)]),
    "equal lengths in contiguous slots: no mask, a view": (
        [W([1], 5, 0, [], True), W([2], 5, 1, [], True)], [1, 2], 2, [0, 1], [0, 1], [0, 1], 0, False, []),
    "slots not contiguous: no view": (
        [W([1], 5, 0, [], True), W([2], 5, 3, [], True)], [1, 2], 2, [0, 3], [0, 1], [0, 1], None, False, []),
    "a chunk past position 0 is a prefill": ([W([4, 4], 6, 0, [], True)], [4, 4], 0, [], [1], [0], None, False,
                                             [(0, 2, 0, 6)]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_step_layout(name):
    work, ids, d, dslots, logit_rows, sampled, first, masked, prefills = CASES[name]
    batch, rows = build_step(work, RANKS, torch.float32, "cpu")
    assert batch.input_ids.tolist() == ids and batch.num_decode == d
    assert batch.decode_slots.tolist() == dslots and batch.decode_first_slot == first
    assert (batch.decode_mask is not None) == masked
    assert batch.logit_rows.tolist() == logit_rows and rows == sampled
    assert [(c.start, c.length, c.slot, c.first_pos) for c in batch.prefills] == prefills
    assert len(batch.positions) == len(ids) == len(batch.slots)


def test_lora_rows_follow_the_layout():
    work = [W([9], 4, 2, [(1, 1.0)], True), W([8], 3, 1, [(0, 1.0)], True)]
    batch, _ = build_step(work, RANKS, torch.float32, "cpu")
    assert batch.input_ids.tolist() == [8, 9] and batch.positions.tolist() == [3, 4]  # slot 0's decode first
    assert batch.lora.slots.tolist() == [0, 1] and batch.lora.gather is None and batch.lora.rank == 8
