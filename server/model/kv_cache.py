"""A preallocated KV cache with one fixed-length slot per running sequence.

Each sequence owns a slot for its whole life, so a running sequence can never run out of cache
and there is nothing to preempt: when every slot is taken, new requests wait in the queue
(admission control). Slots are handed out lowest-first, so a full batch usually occupies a
contiguous range and decode attention reads the cache through a view instead of a gather.

The decoder owns the layout (it writes and attends through ``write`` and ``view``); the engine sizes the
cache and its scheduler hands the slots out.
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
        heapq.heappush(self._free, slot)

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
