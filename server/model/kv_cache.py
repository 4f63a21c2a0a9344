"""A preallocated KV cache with one fixed-length slot per running sequence.

Each sequence owns a slot for its whole life, so a running sequence can never run out of cache
and there is nothing to preempt: when every slot is taken, new requests wait in the queue
(admission control). Slots are handed out lowest-first, so a full batch usually occupies a
contiguous range and decode attention reads the cache through a view instead of a gather.

The decoder owns the layout (it writes and attends through ``write`` and ``view``); the engine sizes the
cache and its scheduler hands the slots out.

Nothing a sequence leaves in its slot reaches the next one: ``release`` zeroes every position the
slot was written at (the decoder ``mark``s the positions of a step before writing them). This is what
keeps requests apart: decode attention reads every slot up to the longest context of the step and
hides a shorter context's tail with a boolean mask, and a mask does not stop NaN or inf (SDPA adds
-inf to a masked score, and NaN + -inf is NaN; a masked value is weighted by 0, and 0 * inf is NaN).
A zeroed tail is finite, so masked positions contribute exactly 0. Clearing rather than masking
with ``torch.where`` on the keys and values, measured 2026-12-01 on an AMD EPYC (AVX2, 1 thread),
SmolLM2-135M fp32, one step of 8 decodes with contexts 24..164: ``where`` on K and V in every layer
made the step ~10% slower (medians 235 vs 213 ms), while ``release`` of a 164-position slot takes
~0.2 ms, once per request.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class CacheShape:
    num_layers: int
    num_slots: int
    max_len: int
    num_kv_heads: int
    head_dim: int


class KVCache:
    def __init__(self, shape: CacheShape, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.shape = shape
        full = (shape.num_layers, shape.num_slots, shape.num_kv_heads, shape.max_len, shape.head_dim)
        self.k = torch.zeros(full, dtype=dtype, device=device)  # [layers, slots, kv_heads, max_len, head_dim]
        self.v = torch.zeros(full, dtype=dtype, device=device)  # [layers, slots, kv_heads, max_len, head_dim]
        self._free = list(range(shape.num_slots))
        heapq.heapify(self._free)
        self._used = [0] * shape.num_slots  # per slot: positions [0, used) may hold values since its last release

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def used_slots(self) -> int:
        return self.shape.num_slots - len(self._free)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def allocate(self) -> int | None:
        return heapq.heappop(self._free) if self._free else None

    def release(self, slot: int) -> None:
        """Hand the slot back, zeroed wherever it was written, so nothing of its sequence reaches the next."""
        end, self._used[slot] = self._used[slot], 0
        if end:
            self.k[:, slot, :, :end].zero_()
            self.v[:, slot, :, :end].zero_()
        heapq.heappush(self._free, slot)

    def mark(self, slot: int, end: int) -> None:
        """Positions [0, end) of slot are about to be written: ``release`` clears them (plain ints, no sync)."""
        if end > self._used[slot]:
            self._used[slot] = end

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values: slots, positions [T]; k, v [T, kv_heads, head_dim]."""
        self.k[layer][slots, :, positions] = k
        self.v[layer][slots, :, positions] = v

    def view(self, layer: int, slots: torch.Tensor, first: int, contiguous: bool, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the given slots up to length: [B, kv_heads, length, head_dim] each."""
        if contiguous:
            sl = slice(first, first + slots.numel())
            return self.k[layer, sl, :, :length], self.v[layer, sl, :, :length]
        return self.k[layer, slots, :, :length], self.v[layer, slots, :, :length]
