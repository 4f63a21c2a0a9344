"""Adapter slots on the device and the batched LoRA delta of one step.

``LoraBank`` preallocates, per target module, ``a: [max_loras, in, max_rank]`` and
``b: [max_loras, max_rank, out]`` (pre-transposed for batched matmuls, the adapter's scale folded
into ``b``). Loading an adapter copies its factors into one slot (zero-padded to ``max_rank``;
modules it does not target stay zero), so serving many adapters never reallocates. The factors
are kept in ``compute_dtype``: float32 on CPU, where small bf16 matmuls cost 4x more than fp32
ones (measured: 51 vs 11 us for the r=16 delta of 32 tokens), the model dtype on CUDA.

``LoraBatch`` says, for one step, which token rows go through which slot with what weight. Rows
are grouped by slot into ``S`` segments padded to a common length ``L``: a token of a single-adapter
request appears once with weight 1, a token of a per-request mixture once per adapter with that
adapter's weight, a base-only token not at all. Every module's delta is then two batched matmuls
whatever the mix: ``x[S, L, in] @ a[slots] @ b[slots]``. When the scheduler has ordered the rows
by slot and the segments are equal (the common steady state), ``x[S, L, in]`` is a view of the
step's activations and the delta is added in place through a view: no gather, no scatter.
The reference semantics (and test oracle) is PEFT's ``_mixed_batch_forward``: each request gets
``sum_i w_i * scale_i * B_i A_i x``.

Pads never reach another request. A pad row repeats its segment's first row and is added back
into it with weight 0: it computes exactly what that row computes through the same slot, so it
adds 0, or, when that delta is inf (the request's own huge activations or adapter), turns a row
that is inf already into NaN. Pads used to read row 0, any request's token, through the segment's
adapter, and 0 * inf = NaN reached a bystander. This way costs nothing. Measured alternatives
(2026-12-01, AMD EPYC AVX2, 1 thread, SmolLM2 r=16 all-linear, the LoRA delta of one step): zeroing
the pads' shrink rows (``index_fill_``) +3%; dropping the pads (``index_select`` of each delta) +12%
for 8 decodes (4 pads in 12 rows) but -20% beside a 32-token prefill chunk (62 pads in 99 rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import delta
from .weights import LoraWeights, ModuleKey


@dataclass(frozen=True, slots=True)
class LoraBatch:
    slots: torch.Tensor  # [S] int64: slot of each segment
    gather: torch.Tensor | None  # [S * L] int64: token row of each padded row (a pad repeats its segment's first row); None: dense
    weights: torch.Tensor | None  # [S * L, 1] compute dtype: weight of each padded row (0 for pads); None: all 1
    seg_len: int  # L
    rank: int  # largest rank among the slots of this step
    first_slot: int | None  # slots are range(first_slot, first_slot + S): weights are read through a view
    dense_start: int  # with gather None: the segments are rows [dense_start, dense_start + S * L) in order
    rows: torch.Tensor  # [S * L] int64: token row of each padded row (gather, or the dense range)
    padded_rows: int  # S * L

    @classmethod
    def build(cls, rows: list[tuple[int, int, list[tuple[int, float]]]], slot_ranks: dict[int, int],
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
            gather.extend(idx + [idx[0]] * pad)  # never another segment's row: see the module doc
            weights.extend(ws + [0.0] * pad)
        first = gather[0]
        dense = gather == list(range(first, first + len(gather)))  # no pads, no repeats, in order
        unit = all(w == 1.0 for w in weights)
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        return cls(
            slots=torch.tensor(slots, dtype=torch.long, device=device),
            gather=None if dense else torch.tensor(gather, dtype=torch.long, device=device),
            weights=None if unit else torch.tensor(weights, dtype=dtype, device=device).unsqueeze(1),
            seg_len=seg_len, rank=max(slot_ranks[s] for s in slots),
            first_slot=slots[0] if contiguous else None, dense_start=first if dense else 0,
            rows=torch.tensor(gather, dtype=torch.long, device=device), padded_rows=len(gather),
        )


# Projections that read the same input share one shrink matmul and one expand matmul.
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",),
}
GROUP_OF = {proj: (g, i) for g, members in GROUPS.items() for i, proj in enumerate(members)}


@dataclass(frozen=True, slots=True, order=True)
class GroupKey:
    layer: int
    group: str  # a key of GROUPS


@dataclass(frozen=True, slots=True)
class SlotImage:
    name: str
    rank: int
    a: dict  # GroupKey -> [in, R * n]
    b: dict  # GroupKey -> list of [R, out_p]


class LoraBank:
    """Slot buffers per (layer, group): one shrink factor for the group, ``a: [slots, in, n * R]``
    (column ``p * R + j`` is rank j of member p), and one expand factor per member,
    ``b[p]: [slots, R, out_p]``. The expand is not fused across members: a block-diagonal fused
    ``b`` would read n times the bytes, and the LoRA cost here is memory traffic, not FLOPs."""

    def __init__(self, shapes: dict[ModuleKey, tuple[int, int]], max_loras: int, max_rank: int,
                 compute_dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.max_loras, self.max_rank, self.dtype, self.device = max_loras, max_rank, compute_dtype, device
        self.shapes = shapes
        self.members: dict[GroupKey, list[tuple[str, int, int]]] = {}  # (proj, out offset, out size)
        in_of: dict[GroupKey, int] = {}
        for key, (in_f, out_f) in sorted(shapes.items()):
            g, _ = GROUP_OF[key.proj]
            gk = GroupKey(key.layer, g)
            members = self.members.setdefault(gk, [])
            members.append((key.proj, sum(m[2] for m in members), out_f))
            in_of[gk] = in_f
        for gk, members in self.members.items():  # member order as in GROUPS
            order = GROUPS[gk.group]
            members.sort(key=lambda m: order.index(m[0]))
            off = 0
            for i, (proj, _, out_f) in enumerate(members):
                members[i] = (proj, off, out_f)
                off += out_f
        self.a = {gk: torch.zeros(max_loras, in_of[gk], max_rank * len(m), dtype=compute_dtype, device=device)
                  for gk, m in self.members.items()}  # [slots, in, R * n]
        self.b = {gk: [torch.zeros(max_loras, max_rank, x[2], dtype=compute_dtype, device=device) for x in m]
                  for gk, m in self.members.items()}  # per member [slots, R, out_p]
        self.ranks: dict[int, int] = {}  # slot -> rank of the adapter in it
        self.offsets = {gk: [m[1] for m in members] for gk, members in self.members.items()}  # members' first columns
        # a few rows' delta in one C++ call (float32 on CPU): see delta.py
        self._stacked: tuple | None = None  # stacked()'s lists, built once (the tensors are filled in place)
        self.small_kernel = delta.op() if compute_dtype == torch.float32 and torch.device(device).type == "cpu" else None

    @property
    def slot_nbytes(self) -> int:
        return sum(t[0].nbytes for t in self.a.values()) + sum(t[0].nbytes for bs in self.b.values() for t in bs)

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

    def prepare(self, weights: LoraWeights) -> SlotImage:
        """The adapter laid out exactly as one slot (transposed, zero-padded, scale folded in), on the
        host: built on the loader thread, so putting it in a slot is a few plain copies."""
        self.check(weights)
        a = {gk: torch.zeros(t.shape[1:], dtype=self.dtype) for gk, t in self.a.items()}  # [in, R * n]
        b = {gk: [torch.zeros(t.shape[1:], dtype=self.dtype) for t in bs] for gk, bs in self.b.items()}  # [R, out_p]
        for key, m in weights.modules.items():
            g, _ = GROUP_OF[key.proj]
            gk = GroupKey(key.layer, g)
            p = next(i for i, mem in enumerate(self.members[gk]) if mem[0] == key.proj)
            r, big_r = m.rank, self.max_rank
            a[gk][:, p * big_r:p * big_r + r].copy_(m.a.t())
            b[gk][p][:r].copy_(m.b.t().float() * m.scale)
        # Folders are checked at validation (finite, |value| bounded); derived adapters (merges, in-memory
        # loaders) are not: a non-finite factor would make this adapter's every delta NaN.
        if not all(bool(t.isfinite().all()) for t in [*a.values(), *(x for bs in b.values() for x in bs)]):
            raise ValueError(f"adapter {weights.name} holds NaN or inf values (after scaling)")
        return SlotImage(weights.name, weights.rank, a, b)

    def set_lora(self, slot: int, weights: LoraWeights | SlotImage) -> None:
        image = weights if isinstance(weights, SlotImage) else self.prepare(weights)
        for gk, t in image.a.items():
            self.a[gk][slot].copy_(t)
            for dst, src in zip(self.b[gk], image.b[gk]):
                dst[slot].copy_(src)
        self.ranks[slot] = image.rank

    def clear(self, slot: int) -> None:
        for gk in self.members:
            self.a[gk][slot].zero_()
            for b in self.b[gk]:
                b[slot].zero_()
        self.ranks.pop(slot, None)

    def segments(self, x: torch.Tensor, batch: LoraBatch) -> torch.Tensor:
        """The step's activations x [T, in] as padded segments [S, L, in] in compute dtype."""
        s, seg = batch.slots.numel(), batch.seg_len
        if batch.gather is None:
            xs = x[batch.dense_start:batch.dense_start + s * seg]
        else:
            xs = x.index_select(0, batch.gather)
        return xs.to(self.dtype).view(s, seg, -1)

    def stacked(self, layers: int, groups: tuple[str, ...]) -> tuple[list, list, list, list]:
        """The groups' factors in stack.py's order (layer by layer, ``groups`` in each): a per group (no elements
        where the bank has none), the members' b's in order, each group's member count, the members' offsets."""
        if self._stacked is None or self._stacked[0] != (layers, groups):
            a, b, members, offsets = [], [], [], []
            for i in range(layers):
                for g in groups:
                    key = GroupKey(i, g)
                    a.append(self.a.get(key, torch.empty(0)))
                    b.extend(self.b.get(key, []))
                    members.append(len(self.b.get(key, [])))
                    offsets.extend(self.offsets.get(key, []))
            self._stacked = ((layers, groups), (a, b, members, offsets))
        return self._stacked[1]

    def apply(self, key: GroupKey, x: torch.Tensor, ys: list[torch.Tensor], batch: LoraBatch) -> None:
        """Add the group's LoRA delta for the step's activations x [T, in] to its outputs ys (as ``add_delta``)."""
        if self.small_kernel is not None and batch.padded_rows <= delta.SMALL_ROWS and x.dtype == torch.float32 \
                and ys[0].dtype == torch.float32:
            self.small_kernel(x, self.a[key], self.b[key], ys, self.offsets[key], batch.rows, batch.slots,
                              batch.weights, batch.seg_len, batch.rank)
        else:
            self.add_delta(key, self.segments(x, batch), ys, batch)

    def add_delta(self, key: GroupKey, xs: torch.Tensor, ys: list[torch.Tensor], batch: LoraBatch) -> None:
        """Add the group's LoRA delta, given xs = segments(x) [S, L, in], to its outputs: one fused
        tensor [T, out of all members], or one [T, out] per member."""
        s, seg, r, big_r = batch.slots.numel(), batch.seg_len, batch.rank, self.max_rank
        if batch.first_slot is not None:
            pick = lambda t: t[batch.first_slot:batch.first_slot + s]  # noqa: E731  (a view)
        else:
            pick = lambda t: t.index_select(0, batch.slots)  # noqa: E731
        h = torch.bmm(xs, pick(self.a[key]))  # [S, L, n * R]
        for p, (_, off, out_f) in enumerate(self.members[key]):
            d = torch.bmm(h[:, :, p * big_r:p * big_r + r], pick(self.b[key][p])[:, :r]).view(s * seg, out_f)
            if batch.weights is not None:
                d = d * batch.weights
            y = ys[p] if len(ys) > 1 else ys[0][:, off:off + out_f]
            self._add(y, d, batch)

    @staticmethod
    def _add(y: torch.Tensor, d: torch.Tensor, batch: LoraBatch) -> None:
        d = d.to(y.dtype)  # one cast; a mixed-dtype in-place add would cast y up and back
        if batch.gather is None:
            rows = d.shape[0]
            y[batch.dense_start:batch.dense_start + rows] += d
        else:
            y.index_add_(0, batch.gather, d)
