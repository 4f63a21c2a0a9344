"""The small-batch LoRA delta op (server/lora/delta.py) against the batched bmm path, on every LoraBatch shape of
test_segments' table (pads, mixtures, rows out of slot order, non-contiguous slots, weights), fused and per-member
outputs, a slot holding inf (only its own rows turn inf/NaN, never a bystander's), and rows or slots out of range
refused instead of read."""

from __future__ import annotations

import pytest
import torch

from loraplex.server.lora import delta
from loraplex.server.lora.bank import GroupKey, LoraBank, LoraBatch
from loraplex.server.lora.weights import ModuleKey

from test_segments import CASES, RANKS

pytestmark = pytest.mark.skipif(not delta.available(), reason=f"no LoRA delta kernel here: {delta.why_not()}")

SHAPES = {ModuleKey(0, "q_proj"): (64, 64), ModuleKey(0, "k_proj"): (64, 32), ModuleKey(0, "v_proj"): (64, 32),
          ModuleKey(0, "o_proj"): (64, 64)}


def filled_bank(seed: int = 0) -> LoraBank:
    torch.manual_seed(seed)
    bank = LoraBank(SHAPES, max_loras=4, max_rank=16, compute_dtype=torch.float32)
    for t in bank.a.values():
        t.normal_()
    for bs in bank.b.values():
        for t in bs:
            t.normal_()
    bank.ranks.update(RANKS)
    return bank


def both_paths(bank: LoraBank, key: GroupKey, x: torch.Tensor, ys: list[torch.Tensor], batch: LoraBatch):
    want = [y.clone() for y in ys]
    bank.add_delta(key, bank.segments(x, batch), want, batch)
    got = [y.clone() for y in ys]
    assert bank.small_kernel is not None and batch.padded_rows <= delta.SMALL_ROWS
    bank.apply(key, x, got, batch)
    return got, want


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("fused", [True, False])
def test_the_op_adds_what_the_batched_path_adds(name, fused):
    bank = filled_bank()
    rows = CASES[name][0]
    batch = LoraBatch.build(rows, RANKS, torch.float32, "cpu")
    t = max(start + count for start, count, _ in rows) + 1  # one base-only row after them
    x = torch.randn(t, 64)
    key = GroupKey(0, "qkv")
    ys = [torch.randn(t, 128)] if fused else [torch.randn(t, 64), torch.randn(t, 32), torch.randn(t, 32)]
    got, want = both_paths(bank, key, x, ys, batch)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0][-1], ys[0][-1])  # the base-only row is left as it was


def test_an_adapter_holding_inf_reaches_only_its_own_rows():
    bank = filled_bank()
    bank.b[GroupKey(0, "o")][0][2].fill_(float("inf"))  # slot 2's expand
    batch = LoraBatch.build([(0, 3, [(0, 1.0)]), (3, 1, [(2, 1.0)])], RANKS, torch.float32, "cpu")  # padded
    x, y = torch.randn(4, 64), torch.zeros(4, 64)
    bank.apply(GroupKey(0, "o"), x, [y], batch)
    assert torch.isfinite(y[:3]).all() and not torch.isfinite(y[3]).all()


def test_rows_or_slots_out_of_range_are_refused():
    bank = filled_bank()
    a, b = bank.a[GroupKey(0, "o")], bank.b[GroupKey(0, "o")]
    x, y = torch.randn(2, 64), torch.zeros(2, 64)
    with pytest.raises(RuntimeError, match="row out of range"):
        delta.add(x, a, b, [y], [0], torch.tensor([5]), torch.tensor([0]), None, 1, 4)
    with pytest.raises(RuntimeError, match="slot out of range"):
        delta.add(x, a, b, [y], [0], torch.tensor([0]), torch.tensor([9]), None, 1, 4)
    assert torch.equal(y, torch.zeros(2, 64))
