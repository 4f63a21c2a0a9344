"""Adapter slots on the device and the batched LoRA delta of one step.

``LoraBank`` preallocates, per target module, ``a: [max_loras, max_rank, in]`` and
``b: [max_loras, out, max_rank]`` (the adapter's scale folded into ``b``). Loading an adapter
copies its factors into one slot (zero-padded to ``max_rank``; modules it does not target stay
zero), so serving many adapters never reallocates.

``LoraBatch`` says, for one step, which token rows go through which slot with what weight. Rows
are grouped by slot into ``S`` segments padded to a common length ``L``: a token of a single-adapter
request appears once with weight 1, a token of a per-request mixture appears once per adapter
with that adapter's weight, a base-only token not at all. Then every module's delta is two batched
matmuls whatever the mix: ``(x[gather] as [S, L, in]) @ a[slots]^T @ b[slots]^T``, scattered back
with ``index_add``. The reference semantics (and test oracle) is PEFT's
``_mixed_batch_forward``: each request gets ``sum_i w_i * scale_i * B_i A_i x``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .weights import LoraWeights, ModuleKey


@dataclass(frozen=True, slots=True)
class LoraBatch:
    slots: torch.Tensor  # [S] int64: slot of each segment
    gather: torch.Tensor  # [S * L] int64: token row feeding each padded segment row (pads point at row 0)
    weights: torch.Tensor  # [S * L, 1] model dtype: weight of each padded row (0 for pads)
    seg_len: int  # L
    rank: int  # largest rank among the slots of this step
    first_slot: int | None  # slots are range(first_slot, first_slot + S): weights are read through a view
    identity: bool  # one segment covering every token in order with weight 1: no gather, no scatter

    @classmethod
    def build(cls, rows: list[tuple[int, int, list[tuple[int, float]]]], num_tokens: int, slot_ranks: dict[int, int],
              dtype: torch.dtype, device: torch.device | str) -> LoraBatch | None:
        """rows: (first token, token count, [(slot, weight), ...]) per sequence; None if no LoRA this step."""
        by_slot: dict[int, tuple[list[int], list[float]]] = {}
        for start, count, mix in rows:
            for slot, w in mix:
                idx, ws = by_slot.setdefault(slot, ([], []))
                idx.extend(range(start, start + count))
                ws.extend([w] * count)
        if not by_slot:
            return None
        slots = sorted(by_slot)
        seg_len = max(len(v[0]) for v in by_slot.values())
        gather, weights = [], []
        for s in slots:
            idx, ws = by_slot[s]
            pad = seg_len - len(idx)
            gather.extend(idx + [0] * pad)
            weights.extend(ws + [0.0] * pad)
        identity = len(slots) == 1 and seg_len == num_tokens and gather == list(range(num_tokens)) and all(w == 1.0 for w in weights)
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        return cls(
            slots=torch.tensor(slots, dtype=torch.long, device=device),
            gather=torch.tensor(gather, dtype=torch.long, device=device),
            weights=torch.tensor(weights, dtype=dtype, device=device).unsqueeze(1),
            seg_len=seg_len, rank=max(slot_ranks[s] for s in slots),
            first_slot=slots[0] if contiguous else None, identity=identity,
        )


class LoraBank:
    def __init__(self, shapes: dict[ModuleKey, tuple[int, int]], max_loras: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.max_loras, self.max_rank, self.dtype, self.device = max_loras, max_rank, dtype, device
        self.shapes = shapes
        self.a = {k: torch.zeros(max_loras, max_rank, i, dtype=dtype, device=device) for k, (i, o) in shapes.items()}  # [slots, R, in]
        self.b = {k: torch.zeros(max_loras, o, max_rank, dtype=dtype, device=device) for k, (i, o) in shapes.items()}  # [slots, out, R]
        self.ranks: dict[int, int] = {}  # slot -> rank of the adapter in it

    @property
    def slot_nbytes(self) -> int:
        return sum(t[0].nbytes for t in self.a.values()) + sum(t[0].nbytes for t in self.b.values())

    def check(self, weights: LoraWeights) -> None:
        """Raise ValueError if the adapter cannot go into a slot (rank, unknown module, shape)."""
        if weights.rank > self.max_rank:
            raise ValueError(f"adapter {weights.name} has rank {weights.rank}, above max_lora_rank {self.max_rank}")
        for key, m in weights.modules.items():
            if key not in self.shapes:
                raise ValueError(f"adapter {weights.name} targets {key}, which the base model does not have")
            in_f, out_f = self.shapes[key]
            if m.a.shape[1] != in_f or m.b.shape[0] != out_f:
                raise ValueError(f"adapter {weights.name}: {key} maps {m.a.shape[1]} -> {m.b.shape[0]}, base has {in_f} -> {out_f}")

    def set_lora(self, slot: int, weights: LoraWeights) -> None:
        self.check(weights)
        self.clear(slot)
        for key, m in weights.modules.items():
            r = m.rank
            self.a[key][slot, :r].copy_(m.a)
            self.b[key][slot, :, :r].copy_(m.b.float() * m.scale)
        self.ranks[slot] = weights.rank

    def clear(self, slot: int) -> None:
        for key in self.shapes:
            self.a[key][slot].zero_()
            self.b[key][slot].zero_()
        self.ranks.pop(slot, None)

    def add_delta(self, key: ModuleKey, x: torch.Tensor, y: torch.Tensor, batch: LoraBatch, xg: torch.Tensor | None = None) -> None:
        """y [T, out] += LoRA delta of x [T, in]; xg is x[batch.gather] when the caller already has it."""
        r, s, seg = batch.rank, batch.slots.numel(), batch.seg_len
        if batch.first_slot is not None:
            a = self.a[key][batch.first_slot:batch.first_slot + s, :r]  # [S, R, in] view
            b = self.b[key][batch.first_slot:batch.first_slot + s, :, :r]  # [S, out, R] view
        else:
            a = self.a[key].index_select(0, batch.slots)[:, :r]
            b = self.b[key].index_select(0, batch.slots)[:, :, :r]
        if batch.identity:
            h = x.unsqueeze(0) @ a.transpose(1, 2)  # [1, T, R]
            y += (h @ b.transpose(1, 2)).squeeze(0)
            return
        if xg is None:
            xg = x.index_select(0, batch.gather)
        h = torch.bmm(xg.view(s, seg, -1), a.transpose(1, 2))  # [S, L, R]
        d = torch.bmm(h, b.transpose(1, 2)).view(s * seg, -1)  # [S*L, out]
        y.index_add_(0, batch.gather, d * batch.weights)
