"""A paged KV cache: one pool of fixed-size blocks, a block table per sequence.

Memory follows the work: a sequence holds ``ceil(tokens / block_size)`` blocks, taken as it grows, so the
pool (sized by a memory budget) serves many short requests or a few long ones, and ``max_model_len`` can
be the model's whole context. The decoder writes each token at ``block * block_size + offset`` and reads a
sequence's keys and values by gathering its blocks (``gather``): one ``index_select`` of whole blocks per
layer, which is cheap next to the projections (measured in the README), and works on CPU and CUDA alike.

Which sequence holds which block, and which blocks are kept for reuse, is ``server.engine.block_pool``'s.
Block 0 is the null block: never handed out, always zero. Block tables of a batch are padded with it, so a
row shorter than the batch's longest reads zeros under its mask. Nothing a sequence leaves in a block reaches
the next one: a block is zeroed when it is handed out (``BlockPool.allocate``), so every position a sequence
has not written yet is 0. That is what keeps requests apart: a boolean mask does not stop NaN or inf (SDPA adds -inf to
a masked score, and NaN + -inf is NaN; a masked value is weighted by 0, and 0 * inf is NaN), a zero does.
Zeroing on allocation rather than at release also means pages of the pool are touched only once used: the
budget is an upper bound, not what the process holds at start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import fused

NULL_BLOCK = 0


@dataclass(frozen=True, slots=True)
class CacheShape:
    num_layers: int
    num_blocks: int  # including the null block
    block_size: int  # tokens per block
    num_kv_heads: int
    head_dim: int

    @staticmethod
    def blocks_for(budget_bytes: int, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                   dtype: torch.dtype) -> int:
        """How many blocks (null block included) fit in ``budget_bytes``."""
        per_block = 2 * num_layers * num_kv_heads * head_dim * block_size * torch.empty(0, dtype=dtype).element_size()
        return budget_bytes // per_block


class KVCache:
    def __init__(self, shape: CacheShape, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        if shape.num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks (one is the null block)")
        self.shape = shape
        self.block_size = shape.block_size
        full = (shape.num_layers, shape.num_kv_heads, shape.num_blocks, shape.block_size, shape.head_dim)
        # torch.empty: pages are touched when a block is first handed out (and zeroed), not here.
        self.k = torch.empty(full, dtype=dtype, device=device)  # [layers, kv_heads, blocks, block_size, head_dim]
        self.v = torch.empty(full, dtype=dtype, device=device)  # [layers, kv_heads, blocks, block_size, head_dim]
        # float32 on CPU: writes are one C++ op (fused.py) instead of two index_puts
        self._fused = fused.ops() if dtype == torch.float32 and torch.device(device).type == "cpu" else None
        self.zero(NULL_BLOCK)

    @property
    def total_blocks(self) -> int:
        """Blocks sequences can hold (the null block aside)."""
        return self.shape.num_blocks - 1

    @property
    def nbytes(self) -> int:
        """Bytes of the whole pool (its budget; pages are touched as blocks are first used)."""
        return self.k.nbytes + self.v.nbytes

    @property
    def block_nbytes(self) -> int:
        return self.nbytes // self.shape.num_blocks

    def zero(self, block: int) -> None:
        """Clear a block before it is handed out (``BlockPool.allocate``)."""
        self.k[:, :, block].zero_()
        self.v[:, :, block].zero_()

    # ---- what the decoder calls --------------------------------------------------------------------------
    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values: slot_mapping [T] (block * block_size + offset); k, v [T, kv_heads, head_dim]."""
        n = self.shape.num_blocks * self.block_size
        if self._fused is not None and k.dtype == self.k[layer].dtype:  # one op (fused.py)
            kv, hd = self.shape.num_kv_heads, self.shape.head_dim
            self._fused.kv_write(self.k[layer].view(kv, n, hd), self.v[layer].view(kv, n, hd), slot_mapping, k, v)
            return
        self.k[layer].view(self.shape.num_kv_heads, n, self.shape.head_dim)[:, slot_mapping] = k.transpose(0, 1)
        self.v[layer].view(self.shape.num_kv_heads, n, self.shape.head_dim)[:, slot_mapping] = v.transpose(0, 1)

    def gather(self, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the sequences whose block tables are the rows of ``tables`` [B, nb] (padded with
        the null block): [kv_heads, B, nb * block_size, head_dim] each, contiguous (KV head first: what one
        ``index_select`` of whole blocks gives; the decoder attends in that layout)."""
        b, nb = tables.shape
        flat = tables.reshape(-1)
        kv, hd = self.shape.num_kv_heads, self.shape.head_dim
        k = self.k[layer].index_select(1, flat).view(kv, b, nb * self.block_size, hd)
        v = self.v[layer].index_select(1, flat).view(kv, b, nb * self.block_size, hd)
        return k, v
