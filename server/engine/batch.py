"""Turning the scheduler's choice for one step into the decoder's ``StepBatch``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..lora.bank import LoraBatch
from ..model.decoder import PrefillChunk, StepBatch
from ..model.kv_cache import NULL_BLOCK


@dataclass(frozen=True, slots=True)
class Work:
    """One sequence's share of a step: feed ``tokens`` at positions first_pos... into its KV blocks."""

    tokens: list[int]
    first_pos: int
    blocks: list[int]  # the sequence's block table: position p lives in blocks[p // block_size]
    lora: list[tuple[int, float]]  # (bank slot, weight); empty for the base model
    wants_logits: bool  # False for a prefill chunk that is not the prompt's last
    scored: int = 0  # its first tokens whose next token's logprob is asked for (prompt logprobs)


def build_step(work: list[Work], slot_ranks: dict[int, int], lora_dtype: torch.dtype, device,
               block_size: int) -> tuple[StepBatch, list[int], list[int]]:
    """The batch (decodes, i.e. single tokens past position 0, first; prefill chunks after); the indices into
    ``work`` of its sampled logits rows, in order; then the indices of the works that score tokens, whose rows
    (``scored`` each) follow the sampled ones in the same order."""
    is_decode = [len(w.tokens) == 1 and w.first_pos > 0 for w in work]
    # Decodes grouped by adapter slot (base first), so LoRA segments are contiguous rows.
    lora_key = lambda i: (work[i].lora[0][0] if len(work[i].lora) == 1 else -1 if not work[i].lora else 1 << 30)  # noqa: E731
    order = sorted((i for i, d in enumerate(is_decode) if d), key=lora_key)
    order += [i for i, d in enumerate(is_decode) if not d]
    decodes = [work[i] for i in order if is_decode[i]]
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    ids, pos, mapping, chunks, logit_rows, lora_rows, sampled = [], [], [], [], [], [], []
    score_rows, scoring = [], []
    for i in order:
        w = work[i]
        start = len(ids)
        ids.extend(w.tokens)
        positions = range(w.first_pos, w.first_pos + len(w.tokens))
        pos.extend(positions)
        mapping.extend(w.blocks[p // block_size] * block_size + p % block_size for p in positions)
        if len(w.tokens) > 1 or w.first_pos == 0:
            end = w.first_pos + len(w.tokens)
            table = as_long([w.blocks[:-(-end // block_size)]]) if w.first_pos else None
            chunks.append(PrefillChunk(start, len(w.tokens), w.first_pos, table))
        if w.wants_logits:
            logit_rows.append(len(ids) - 1)
            sampled.append(i)
        if w.scored:
            score_rows.extend(range(start, start + w.scored))
            scoring.append(i)
        if w.lora:
            lora_rows.append((start, len(w.tokens), w.lora))
    d = len(decodes)
    lens = [w.first_pos + 1 for w in decodes]
    nb = -(-max(lens, default=0) // block_size)
    tables = [w.blocks[:-(-n // block_size)] for w, n in zip(decodes, lens)]
    tables = [t + [NULL_BLOCK] * (nb - len(t)) for t in tables]
    mask = None
    if d and min(lens) != nb * block_size:
        mask = (torch.arange(nb * block_size, device=device).unsqueeze(0) < as_long(lens).unsqueeze(1)).view(1, d, 1, -1)
    batch = StepBatch(
        input_ids=as_long(ids), positions=as_long(pos), slot_mapping=as_long(mapping), num_decode=d,
        decode_tables=as_long(tables).view(d, nb), decode_mask=mask, decode_lens=as_long(lens), prefills=tuple(chunks),
        logit_rows=as_long(logit_rows + score_rows),
        lora=LoraBatch.build(lora_rows, slot_ranks, lora_dtype, device) if lora_rows else None,
    )
    return batch, sampled, scoring
