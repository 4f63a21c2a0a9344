"""Who holds each KV block, and which full blocks later requests reuse (prefix caching).

Every block a running sequence uses is referenced (``allocate``, ``match``); ``free`` drops the references. A
full block is registered under the hash of (what computed it, its tokens, the hash of the blocks before it):
"what computed it" is the sequence's ``identity``, the content digest of its adapter version (or of each
member of a mixture with its weight), or the base's, never a name or an alias, so a prefix cached under one
adapter is never read by another adapter or by the base, and a version replaced under the same name never
serves stale blocks; with the request's cache salt (the API's per-key salt, vLLM's ``cache_salt``), so two
tenants sharing one adapter never share cached blocks (nor learn from a hit's timing what the other sent). Hashes are BLAKE2b (128 bits): a collision would hand one request another's keys and
values, so they are not Python's ``hash``.

A block no sequence references keeps its contents while it is registered: the next request with the same
prefix takes it back (``match``) instead of computing it; an unregistered one is free at once. ``allocate``
takes never-registered free blocks first, then evicts registered free blocks least recently used first. A
sequence's generated tokens are registered too as its blocks fill, so a conversation's next turn finds its
whole history cached.
"""

from __future__ import annotations

import hashlib
import heapq
import struct
from collections import OrderedDict
from collections.abc import Sequence

from ..model.kv_cache import KVCache

BASE_IDENTITY = hashlib.blake2b(b"loraplex:base", digest_size=16).digest()


def identity(adapters: Sequence[tuple[bytes, float]], salt: str | None = None) -> bytes:
    """What computes a sequence's keys and values: the base (no adapter), or its adapters' content digests with
    their weights (a mixture's order matters as its weights do); and who may share them: its cache salt."""
    if not adapters and salt is None:
        return BASE_IDENTITY
    h = hashlib.blake2b(b"loraplex:lora" if adapters else b"loraplex:base", digest_size=16)
    for digest, weight in adapters:
        h.update(digest)
        h.update(struct.pack("<d", float(weight)))
    if salt is not None:
        raw = salt.encode("utf-8", "surrogatepass")
        h.update(b"salt" + struct.pack("<q", len(raw)) + raw)
    return h.digest()


def block_hash(parent: bytes, who: bytes, tokens: Sequence[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(who)
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return h.digest()


class BlockPool:
    def __init__(self, cache: KVCache, caching: bool = True) -> None:
        self.cache = cache
        self.block_size = cache.block_size
        self.caching = caching
        n = cache.shape.num_blocks
        self._refs = [0] * n
        self._hash: list[bytes | None] = [None] * n  # the hash a block is registered under
        self._by_hash: dict[bytes, int] = {}
        self._free = list(range(1, n))  # a heap of unregistered free blocks (block 0 is the null block)
        self._cached: OrderedDict[int, None] = OrderedDict()  # registered blocks nobody holds, LRU first
        self.queries = 0  # prompt tokens looked up in the prefix cache
        self.hits = 0  # of which found there

    # ---- accounting ----------------------------------------------------------------------------------
    @property
    def total_blocks(self) -> int:
        return self.cache.total_blocks

    @property
    def free_blocks(self) -> int:
        """Blocks ``allocate`` can hand out (registered ones nobody holds included)."""
        return len(self._free) + len(self._cached)

    @property
    def used_blocks(self) -> int:
        """Blocks some sequence holds."""
        return self.total_blocks - self.free_blocks

    @property
    def cached_blocks(self) -> int:
        """Registered blocks (held or not): the prefix cache's size."""
        return len(self._by_hash)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ---- blocks ----------------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int] | None:
        """``n`` zeroed blocks, each referenced once, or None (nothing taken) when fewer can be had."""
        if n > self.free_blocks:
            return None
        out = []
        for _ in range(n):
            if self._free:
                b = heapq.heappop(self._free)
            else:  # evict the least recently used cached prefix block
                b, _ = self._cached.popitem(last=False)
                del self._by_hash[self._hash[b]]
                self._hash[b] = None
            self.cache.zero(b)
            self._refs[b] = 1
            out.append(b)
        return out

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block; a registered block nobody holds stays cached (most recently used
        last, so a sequence's first blocks, the most shared, are evicted last when it frees in reverse)."""
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if self._hash[b] is not None:
                    self._cached[b] = None
                else:
                    heapq.heappush(self._free, b)

    def match(self, who: bytes, tokens: Sequence[int]) -> tuple[list[int], list[bytes]]:
        """The longest run of cached full blocks that starts ``tokens`` under ``who``: (blocks, their hashes),
        each block referenced. ``tokens`` should stop short of the last token the caller needs logits for."""
        full = len(tokens) // self.block_size
        self.queries += len(tokens)
        blocks, hashes, parent = [], [], b""
        if not self.caching:
            return blocks, hashes
        for i in range(full):
            h = block_hash(parent, who, tokens[i * self.block_size:(i + 1) * self.block_size])
            b = self._by_hash.get(h)
            if b is None:
                break
            if self._refs[b] == 0:
                del self._cached[b]
            self._refs[b] += 1
            blocks.append(b)
            hashes.append(h)
            parent = h
        self.hits += len(blocks) * self.block_size
        return blocks, hashes

    def register(self, block: int, h: bytes) -> None:
        """``block`` is full and holds what ``h`` names: later requests may reuse it (the first block
        registered under a hash keeps it)."""
        if self.caching and self._hash[block] is None and h not in self._by_hash:
            self._hash[block] = h
            self._by_hash[h] = block
