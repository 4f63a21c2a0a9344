"""The decoder forward of Llama-style models over a flat batch of tokens from many sequences.

The weights are the transformers model's own modules (so bitsandbytes NF4/int8 linears work as
they are); the forward is ours: every step runs each linear once on all tokens ``[T, hidden]``
(decodes and prefill chunks of many requests together), adds each token's LoRA delta from the
``LoraBank``, writes keys/values into the ``KVCache`` slots, and attends per group: all
single-token decodes in one SDPA call, each prefill chunk in one call. Logits are computed only
for the rows that will be sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kv_cache import KVCache
from ..lora.bank import GroupKey, LoraBank, LoraBatch
from ..lora.weights import PROJECTIONS, ModuleKey
from .linear import PackedLinear
from .projection import Projection

SUPPORTED = frozenset({"llama", "mistral", "qwen2"})


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    start: int  # first row of the chunk in the flat batch
    length: int  # number of tokens in the chunk
    slot: int  # KV slot of its sequence
    first_pos: int  # position of its first token (tokens before it are already cached)


@dataclass(frozen=True, slots=True)
class StepBatch:
    """Everything one forward needs; rows [0, num_decode) are decodes, prefill chunks follow."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slots: torch.Tensor  # [T] int64: KV slot of each token
    num_decode: int  # D
    decode_slots: torch.Tensor  # [D] int64
    decode_mask: torch.Tensor | None  # [D, 1, 1, Lmax] bool: key position < context length
    decode_len: int  # Lmax: longest decode context this step
    decode_first_slot: int | None  # sorted decode_slots == range(first, first + D): read the cache by view
    decode_perm: torch.Tensor | None  # [D] int64: decode rows in slot order (None: already in slot order)
    prefills: tuple[PrefillChunk, ...]
    logit_rows: torch.Tensor  # [N] int64: rows whose next-token logits are needed
    lora: LoraBatch | None
    extents: tuple[tuple[int, int], ...]  # (KV slot, end position) per sequence: this step writes below end


class Decoder:
    def __init__(self, model: torch.nn.Module, config, dtype: torch.dtype, device: torch.device | str) -> None:
        if config.model_type not in SUPPORTED:
            raise ValueError(f"unsupported architecture {config.model_type!r}: loraplex serves Llama, Mistral and Qwen2-style models")
        inner = model.model
        self.embed = inner.embed_tokens
        self.norm = inner.norm
        head = model.lm_head
        self.lm_head = PackedLinear(head.weight, head.bias) if type(head) is torch.nn.Linear else head
        self.layers = list(inner.layers)
        self.dtype, self.device = dtype, device
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scaling = self.head_dim ** -0.5
        self.projections = [
            {"qkv": Projection([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj]),
             "o": Projection([l.self_attn.o_proj]),
             "gate_up": Projection([l.mlp.gate_proj, l.mlp.up_proj]),
             "down": Projection([l.mlp.down_proj])}
            for l in self.layers
        ]
        rope = inner.rotary_emb
        self._inv_freq = rope.inv_freq.float().to(device)  # [head_dim / 2]
        self._rope_scale = float(getattr(rope, "attention_scaling", 1.0))
        self._cos = self._sin = torch.empty(0)
        self.max_positions = 0
        self.extend_rope(int(getattr(config, "max_position_embeddings", 2048)))

    @property
    def packed_nbytes(self) -> int:
        """Bytes of the oneDNN-packed weight copies (0 where nothing packs)."""
        heads = self.lm_head.nbytes if isinstance(self.lm_head, PackedLinear) else 0
        return heads + sum(p.dense.nbytes for layer in self.projections for p in layer.values() if p.dense is not None)

    def release_dense(self) -> None:
        """Free the dense projection weights whose packed copies replace them (the LM head stays: its
        weight is the embedding table too)."""
        for layer in self.projections:
            for p in layer.values():
                p.release_dense()

    def extend_rope(self, n: int) -> None:
        freqs = torch.outer(torch.arange(n, dtype=torch.float32, device=self.device), self._inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos = (emb.cos() * self._rope_scale).to(self.dtype)  # [max_pos, head_dim]
        self._sin = (emb.sin() * self._rope_scale).to(self.dtype)  # [max_pos, head_dim]
        self.max_positions = n

    def module_shapes(self) -> dict[ModuleKey, tuple[int, int]]:
        """(in_features, out_features) of every LoRA-targetable projection."""
        shapes = {}
        for i, layer in enumerate(self.layers):
            for proj in PROJECTIONS:
                mod = getattr(layer.self_attn if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp, proj)
                shapes[ModuleKey(i, proj)] = (mod.in_features, mod.out_features)
        return shapes

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _project(self, layer: int, group: str, x: torch.Tensor, bank: LoraBank | None, lora: LoraBatch | None) -> list[torch.Tensor]:
        proj = self.projections[layer][group]
        ys = proj(x)
        if lora is not None:
            bank.add_delta(GroupKey(layer, group), bank.segments(x, lora), ys, lora)
        return proj.split(ys)

    @torch.inference_mode()
    def forward(self, batch: StepBatch, cache: KVCache, bank: LoraBank | None) -> torch.Tensor:
        """Logits [N, vocab] (float32) for batch.logit_rows."""
        for slot, end in batch.extents:  # before any write, so a failed step's writes are cleared too
            cache.mark(slot, end)
        t = batch.input_ids.numel()
        h = self.embed(batch.input_ids).to(self.dtype)  # [T, hidden]
        cos = self._cos[batch.positions].unsqueeze(1)  # [T, 1, head_dim]
        sin = self._sin[batch.positions].unsqueeze(1)
        lora = batch.lora if bank is not None else None
        for i, layer in enumerate(self.layers):
            x = layer.input_layernorm(h)
            q, k, v = self._project(i, "qkv", x, bank, lora)
            q = self._rotate(q.view(t, self.num_heads, self.head_dim), cos, sin)
            k = self._rotate(k.view(t, self.num_kv_heads, self.head_dim), cos, sin)
            cache.write(i, batch.slots, batch.positions, k, v.view(t, self.num_kv_heads, self.head_dim))
            o = self._attention(i, q, batch, cache)  # [T, heads * head_dim]
            h = h + self._project(i, "o", o, bank, lora)[0]
            x = layer.post_attention_layernorm(h)
            g, u = self._project(i, "gate_up", x, bank, lora)
            a = layer.mlp.act_fn(g) * u
            h = h + self._project(i, "down", a, bank, lora)[0]
        h = self.norm(h.index_select(0, batch.logit_rows))
        return self.lm_head(h).float()

    def _attention(self, layer: int, q: torch.Tensor, batch: StepBatch, cache: KVCache) -> torch.Tensor:
        t = q.shape[0]
        out = torch.empty(t, self.num_heads, self.head_dim, dtype=q.dtype, device=q.device)
        gqa = self.num_kv_heads != self.num_heads
        d = batch.num_decode
        if d:
            k, v = cache.view(layer, batch.decode_slots, batch.decode_first_slot or 0,
                              batch.decode_first_slot is not None, batch.decode_len)  # [D, kv, Lmax, hd]
            perm = batch.decode_perm
            qd = (q[:d] if perm is None else q.index_select(0, perm)).unsqueeze(2)  # [D, heads, 1, hd]
            # Rows shorter than Lmax read their slot's tail under the mask: zeros (KVCache.release clears what the
            # slot's last sequence wrote), never another request's values, so NaN/inf cannot leak through the mask.
            od = F.scaled_dot_product_attention(qd, k, v, attn_mask=batch.decode_mask, scale=self.scaling, enable_gqa=gqa)
            if perm is None:
                out[:d] = od.squeeze(2)
            else:
                out.index_copy_(0, perm, od.squeeze(2))
        for c in batch.prefills:
            end = c.first_pos + c.length
            k = cache.k[layer, c.slot:c.slot + 1, :, :end]  # [1, kv, end, hd]
            v = cache.v[layer, c.slot:c.slot + 1, :, :end]
            qc = q[c.start:c.start + c.length].transpose(0, 1).unsqueeze(0)  # [1, heads, n, hd]
            if c.first_pos == 0:
                oc = F.scaled_dot_product_attention(qc, k, v, is_causal=True, scale=self.scaling, enable_gqa=gqa)
            else:
                qpos = torch.arange(c.first_pos, end, device=q.device).unsqueeze(1)
                mask = torch.arange(end, device=q.device).unsqueeze(0) <= qpos  # [n, end]
                oc = F.scaled_dot_product_attention(qc, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=gqa)
            out[c.start:c.start + c.length] = oc.squeeze(0).transpose(0, 1)
        return out.view(t, self.num_heads * self.head_dim)
