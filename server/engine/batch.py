"""Turning the scheduler's choice for one step into the decoder's ``StepBatch``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..lora.bank import LoraBatch
from ..model.decoder import PrefillChunk, StepBatch


@dataclass(frozen=True, slots=True)
class Work:
    """One sequence's share of a step: feed ``tokens`` at positions first_pos... into its KV slot."""

    tokens: list[int]
    first_pos: int
    slot: int
    lora: list[tuple[int, float]]  # (bank slot, weight); empty for the base model
    wants_logits: bool  # False for a prefill chunk that is not the prompt's last


def build_step(work: list[Work], slot_ranks: dict[int, int], lora_dtype: torch.dtype, device) -> tuple[StepBatch, list[int]]:
    """The batch (decodes, i.e. single tokens past position 0, first; prefill chunks after), and the
    indices into ``work`` of the rows of its logits, in order."""
    is_decode = [len(w.tokens) == 1 and w.first_pos > 0 for w in work]
    # Decodes grouped by adapter slot (base first), so LoRA segments are contiguous rows.
    lora_key = lambda i: (work[i].lora[0][0] if len(work[i].lora) == 1 else -1 if not work[i].lora else 1 << 30)  # noqa: E731
    order = sorted((i for i, d in enumerate(is_decode) if d), key=lora_key)
    order += [i for i, d in enumerate(is_decode) if not d]
    decodes = [work[i] for i in order if is_decode[i]]
    ids, pos, slots, chunks, logit_rows, lora_rows, sampled = [], [], [], [], [], [], []
    for i in order:
        w = work[i]
        start = len(ids)
        ids.extend(w.tokens)
        pos.extend(range(w.first_pos, w.first_pos + len(w.tokens)))
        slots.extend([w.slot] * len(w.tokens))
        if len(w.tokens) > 1 or w.first_pos == 0:
            chunks.append(PrefillChunk(start, len(w.tokens), w.slot, w.first_pos))
        if w.wants_logits:
            logit_rows.append(len(ids) - 1)
            sampled.append(i)
        if w.lora:
            lora_rows.append((start, len(w.tokens), w.lora))
    d = len(decodes)
    # Attention reads the cache in slot order; rows are in adapter order: keep the permutation.
    perm = sorted(range(d), key=lambda r: decodes[r].slot)
    dslots = [decodes[r].slot for r in perm]
    lens = [decodes[r].first_pos + 1 for r in perm]
    lmax = max(lens, default=0)
    mask = None
    if d and min(lens) != lmax:
        mask = (torch.arange(lmax, device=device).unsqueeze(0) < torch.tensor(lens, device=device).unsqueeze(1))
        mask = mask.view(d, 1, 1, lmax)
    contiguous = d > 0 and dslots == list(range(dslots[0], dslots[0] + d))
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    batch = StepBatch(
        input_ids=as_long(ids), positions=as_long(pos), slots=as_long(slots), num_decode=d,
        decode_slots=as_long(dslots), decode_mask=mask, decode_len=lmax,
        decode_first_slot=dslots[0] if contiguous else None,
        decode_perm=None if perm == list(range(d)) else as_long(perm), prefills=tuple(chunks),
        logit_rows=as_long(logit_rows),
        lora=LoraBatch.build(lora_rows, slot_ranks, lora_dtype, device) if lora_rows else None,
        extents=tuple((w.slot, w.first_pos + len(w.tokens)) for w in work),
    )
    return batch, sampled
