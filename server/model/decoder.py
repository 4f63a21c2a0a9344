"""The decoder forward of Llama-style models over a flat batch of tokens from many sequences.

The weights are the transformers model's own modules (so bitsandbytes NF4/int8 linears work as
they are); the forward is ours: every step runs each linear once on all tokens ``[T, hidden]``
(decodes and prefill chunks of many requests together), adds each token's LoRA delta from the
``LoraBank``, writes keys/values into the paged ``KVCache``, and attends per group: all
single-token decodes in one call (on CPU the paged kernel, which reads each sequence's blocks in place; else SDPA over
their gathered blocks), each prefill chunk in one SDPA call. Logits are computed only for the rows that will be sampled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import fused, nf4, paged_attention, stack
from .kv_cache import KVCache
from ..lora import delta
from ..lora.bank import GroupKey, LoraBank, LoraBatch
from ..lora.weights import PROJECTIONS, ModuleKey
from .compact import CompactLinear
from .linear import PackedLinear
from .nf4 import Nf4Linear
from .projection import Projection

log = logging.getLogger("loraplex.engine")

SUPPORTED = frozenset({"llama", "mistral", "qwen2"})


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    start: int  # first row of the chunk in the flat batch
    length: int  # number of tokens in the chunk
    first_pos: int  # position of its first token (tokens before it are already cached)
    table: torch.Tensor | None  # [1, nb] int64: its sequence's blocks up to the chunk's end (None when first_pos == 0)


@dataclass(frozen=True, slots=True)
class StepBatch:
    """Everything one forward needs; rows [0, num_decode) are decodes, prefill chunks follow."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: where each token's keys/values go (block * block_size + offset)
    num_decode: int  # D
    decode_tables: torch.Tensor  # [D, nb] int64: each decode's block table, padded with the null block
    decode_mask: torch.Tensor | None  # [1, D, 1, nb * block_size] bool: key position < context length (None: all full)
    decode_lens: torch.Tensor  # [D] int64: each decode's context length (its position + 1)
    prefills: tuple[PrefillChunk, ...]
    logit_rows: torch.Tensor  # [N] int64: rows whose next-token logits are needed
    lora: LoraBatch | None


class Decoder:
    def __init__(self, model: torch.nn.Module, config, dtype: torch.dtype, device: torch.device | str) -> None:
        if config.model_type not in SUPPORTED:
            raise ValueError(f"unsupported architecture {config.model_type!r}: loraplex serves Llama, Mistral and Qwen2-style models")
        inner = model.model
        self.embed = inner.embed_tokens
        self.norm = inner.norm
        head = model.lm_head
        self.lm_head = head
        if type(head) is torch.nn.Linear:  # float32 on CPU: its exact int8/bfloat16 form where it has one
            compact = CompactLinear.build(head.weight, head.bias) if dtype == torch.float32 else None
            self.lm_head = compact or PackedLinear(head.weight, head.bias)
        self.layers = list(inner.layers)
        self.dtype, self.device = dtype, device
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scaling = self.head_dim ** -0.5
        self.paged = paged_attention.available(device)  # decodes read the pool in place (else gather + SDPA)
        self.projections = [
            {"qkv": Projection([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj], dtype),
             "o": Projection([l.self_attn.o_proj], dtype),
             "gate_up": Projection([l.mlp.gate_proj, l.mlp.up_proj], dtype),
             "down": Projection([l.mlp.down_proj], dtype)}
            for l in self.layers
        ]
        if self.linears.startswith("bitsandbytes") and dtype == torch.float32 and nf4.why_not():
            log.warning("NF4 kernel unavailable (%s): bitsandbytes' CPU path runs the 4-bit linears (slow without "
                        "AVX-512; --weights dense holds their values in float32 instead)", nf4.why_not())
        # the layers' elementwise work as C++ ops (float32 on CPU; None: PyTorch ops)
        self.fused = fused.ops() if self._fusable(config) else None
        # an all-decode step's layers as one C++ call (stack.py): float32 NF4 kernel linears, fused ops, paged
        self.stack = stack.ops() if self.fused is not None and self.paged and all(
            isinstance(p.dense, Nf4Linear) for layer in self.projections for p in layer.values()) else None
        self._stack_args: tuple | None = None  # the layers' tensors in the op's order, gathered on first use
        rope = inner.rotary_emb
        self._inv_freq = rope.inv_freq.float().to(device)  # [head_dim / 2]
        self._rope_scale = float(getattr(rope, "attention_scaling", 1.0))
        self._cos = self._sin = torch.empty(0)
        self.max_positions = 0
        self.extend_rope(int(getattr(config, "max_position_embeddings", 2048)))

    @property
    def packed_nbytes(self) -> int:
        """Bytes of the weight copies the decoder holds beside the model's: oneDNN-packed weights, NF4 codes."""
        heads = self.lm_head.nbytes if isinstance(self.lm_head, (PackedLinear, CompactLinear)) else 0
        return heads + sum(p.dense.nbytes for layer in self.projections for p in layer.values() if p.dense is not None)

    @property
    def linears(self) -> str:
        """What runs the projections: "nf4 kernel", "oneDNN packed", "dense" or "bitsandbytes" (the first's), the
        LM head's compact form if it has one, and whether decode steps run as stack.py's one op."""
        p = self.projections[0]["qkv"].dense if self.projections else None
        if isinstance(p, Nf4Linear):
            kind = "nf4 kernel"
        elif isinstance(p, PackedLinear):
            kind = "oneDNN packed" if p.packed is not None else "dense"
        else:
            kind = "bitsandbytes" if p is None and self.projections else "dense"
        kind += f", LM head {self.lm_head.form}" if isinstance(self.lm_head, CompactLinear) else ""
        return kind + (", decode steps in one C++ call" if getattr(self, "stack", None) is not None else "")

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

    def _project_raw(self, layer: int, group: str, x: torch.Tensor, bank: LoraBank | None,
                     lora: LoraBatch | None) -> list[torch.Tensor]:
        """The group's outputs with their LoRA deltas: one [T, sum(out)] tensor when fused, else one per member."""
        ys = self.projections[layer][group](x)
        if lora is not None:
            bank.apply(GroupKey(layer, group), x, ys, lora)
        return ys

    def _project(self, layer: int, group: str, x: torch.Tensor, bank: LoraBank | None, lora: LoraBatch | None) -> list[torch.Tensor]:
        return self.projections[layer][group].split(self._project_raw(layer, group, x, bank, lora))

    def _fusable(self, config) -> bool:
        """Whether the layers' elementwise work can run as fused.py's ops: float32 on CPU, fused q/k/v and
        gate/up outputs, RMSNorms in float32, SiLU."""
        if self.dtype != torch.float32 or torch.device(self.device).type != "cpu" or fused.ops() is None:
            return False
        if getattr(config, "hidden_act", None) != "silu":
            return False
        norms = [self.norm] + [n for l in self.layers for n in (l.input_layernorm, l.post_attention_layernorm)]
        if not all(getattr(n, "weight", None) is not None and n.weight.dtype == torch.float32
                   and hasattr(n, "variance_epsilon") for n in norms):
            return False
        return all(p["qkv"].one_output and p["gate_up"].one_output for p in self.projections)

    @torch.inference_mode()
    def forward(self, batch: StepBatch, cache: KVCache, bank: LoraBank | None) -> torch.Tensor:
        """Logits [N, vocab] (float32) for batch.logit_rows."""
        if self.fused is not None:
            if self._stacks(batch, bank):
                return self._forward_stack(batch, cache, bank)
            return self._forward_fused(batch, cache, bank)
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
            v = v.view(t, self.num_kv_heads, self.head_dim)
            cache.write(i, batch.slot_mapping, k, v)
            o = self._attention(i, q, k, v, batch, cache)  # [T, heads * head_dim]
            h = h + self._project(i, "o", o, bank, lora)[0]
            x = layer.post_attention_layernorm(h)
            g, u = self._project(i, "gate_up", x, bank, lora)
            a = layer.mlp.act_fn(g) * u
            h = h + self._project(i, "down", a, bank, lora)[0]
        h = self.norm(h.index_select(0, batch.logit_rows))
        return self.lm_head(h).float()

    def _stacks(self, batch: StepBatch, bank: LoraBank | None) -> bool:
        """Whether stack.py's op can run this step: every row a decode the NF4 kernel takes, and no LoRA or a LoRA
        batch small enough for the small-rows op."""
        t = batch.input_ids.numel()
        if self.stack is None or batch.prefills or batch.num_decode != t or t > nf4.KERNEL_ROWS:
            return False
        lora = batch.lora if bank is not None else None
        return lora is None or (bank.small_kernel is not None and lora.padded_rows <= delta.SMALL_ROWS)

    def _forward_stack(self, batch: StepBatch, cache: KVCache, bank: LoraBank | None) -> torch.Tensor:
        """``_forward_fused`` for an all-decode step, its layer loop in one C++ call."""
        if self._stack_args is None:
            denses = [layer[g].dense for layer in self.projections for g in stack.GROUPS]
            norms = [n.weight for l in self.layers for n in (l.input_layernorm, l.post_attention_layernorm)]
            none = torch.empty(0)
            self._stack_args = (norms, [d.codes for d in denses], [d.absmax for d in denses], [d.lut for d in denses],
                                [none if d.bias is None else d.bias for d in denses], [d.out_features for d in denses])
        lora = batch.lora if bank is not None else None
        if lora is None:
            a, b, members, offsets, rows, slots, weights, seg_len, rank = [], [], [], [], None, None, None, 0, 0
        else:
            a, b, members, offsets = bank.stacked(len(self.layers), stack.GROUPS)
            rows, slots, weights, seg_len, rank = lora.rows, lora.slots, lora.weights, lora.seg_len, lora.rank
        h = self.embed(batch.input_ids).to(self.dtype).contiguous()  # [T, hidden]
        ln = self.layers[0].input_layernorm
        h = self.stack.decode_stack(h, batch.positions, self._cos, self._sin, batch.slot_mapping, batch.decode_tables,
                                    batch.decode_lens, self.scaling, ln.variance_epsilon, self.num_heads,
                                    self.num_kv_heads, self.head_dim, *self._stack_args, cache.k, cache.v, a, b,
                                    members, offsets, rows, slots, weights, seg_len, rank)
        return self.lm_head(self.fused.add_rms_norm(h.index_select(0, batch.logit_rows), None, self.norm.weight,
                                                    self.norm.variance_epsilon)).float()

    def _forward_fused(self, batch: StepBatch, cache: KVCache, bank: LoraBank | None) -> torch.Tensor:
        """``forward`` with each layer's norms, rotary embedding and activation as fused.py's ops."""
        ops = self.fused
        t = batch.input_ids.numel()
        h = self.embed(batch.input_ids).to(self.dtype).contiguous()  # [T, hidden], the residual, updated in place
        lora = batch.lora if bank is not None else None
        nq, nk = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        y = None  # the last projection's output, not yet added to h
        for i, layer in enumerate(self.layers):
            ln = layer.input_layernorm
            x = ops.add_rms_norm(h, y, ln.weight, ln.variance_epsilon)
            [qkv] = self._project_raw(i, "qkv", x, bank, lora)  # [T, nq + 2 nk]
            ops.rope(qkv, batch.positions, self._cos, self._sin, self.num_heads + self.num_kv_heads, self.head_dim)
            q = qkv[:, :nq].view(t, self.num_heads, self.head_dim)
            k = qkv[:, nq:nq + nk].view(t, self.num_kv_heads, self.head_dim)
            v = qkv[:, nq + nk:].view(t, self.num_kv_heads, self.head_dim)
            cache.write(i, batch.slot_mapping, k, v)
            o = self._attention(i, q, k, v, batch, cache)  # [T, heads * head_dim]
            [y] = self._project_raw(i, "o", o, bank, lora)
            ln = layer.post_attention_layernorm
            x = ops.add_rms_norm(h, y, ln.weight, ln.variance_epsilon)
            [gu] = self._project_raw(i, "gate_up", x, bank, lora)  # [T, 2 * intermediate]
            [y] = self._project_raw(i, "down", ops.silu_mul(gu), bank, lora)
        h.add_(y)
        return self.lm_head(ops.add_rms_norm(h.index_select(0, batch.logit_rows), None, self.norm.weight,
                                             self.norm.variance_epsilon)).float()

    def _attention(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, batch: StepBatch,
                   cache: KVCache) -> torch.Tensor:
        """q [T, heads, hd]; k_new, v_new [T, kv, hd]: this step's keys and values (also written to the cache)."""
        t = q.shape[0]
        out = torch.empty(t, self.num_heads, self.head_dim, dtype=q.dtype, device=q.device)
        gqa = self.num_kv_heads != self.num_heads
        d = batch.num_decode
        if d and self.paged:
            group = self.num_heads // self.num_kv_heads
            qd = q[:d].view(d, self.num_kv_heads, group, self.head_dim)  # [D, kv, group, hd]
            od = paged_attention.paged_decode(qd, cache.k[layer], cache.v[layer], batch.decode_tables,
                                              batch.decode_lens, self.scaling)
            out[:d] = od.view(d, self.num_heads, self.head_dim)
        elif d:
            k, v = cache.gather(layer, batch.decode_tables)  # [kv, D, nb * block_size, hd]
            # One query per head: the heads that share a KV head are that "sequence"'s queries, so SDPA runs on
            # the gathered layout as it is (a transposed copy with a mask took 10x longer on CPU, see the README).
            # Rows shorter than the longest read their blocks' unwritten tail and the null block under the mask:
            # zeros (KVCache.allocate clears a block it hands out), never another request's values, so NaN/inf
            # cannot leak through the mask.
            group = self.num_heads // self.num_kv_heads
            qd = q[:d].view(d, self.num_kv_heads, group, self.head_dim).transpose(0, 1)  # [kv, D, group, hd]
            od = F.scaled_dot_product_attention(qd, k, v, attn_mask=batch.decode_mask, scale=self.scaling)
            out[:d] = od.transpose(0, 1).reshape(d, self.num_heads, self.head_dim)
        for c in batch.prefills:
            end = c.first_pos + c.length
            qc = q[c.start:c.start + c.length].transpose(0, 1).unsqueeze(0)  # [1, heads, n, hd]
            if c.first_pos == 0:  # the whole context is this chunk: attend to its own keys, no gather
                k = k_new[c.start:c.start + c.length].transpose(0, 1).unsqueeze(0)  # [1, kv, n, hd]
                v = v_new[c.start:c.start + c.length].transpose(0, 1).unsqueeze(0)
                oc = F.scaled_dot_product_attention(qc, k, v, is_causal=True, scale=self.scaling, enable_gqa=gqa)
            else:
                k, v = cache.gather(layer, c.table)  # [kv, 1, nb * block_size, hd]
                k, v = k.transpose(0, 1)[:, :, :end], v.transpose(0, 1)[:, :, :end]  # [1, kv, end, hd]
                qpos = torch.arange(c.first_pos, end, device=q.device).unsqueeze(1)
                mask = torch.arange(end, device=q.device).unsqueeze(0) <= qpos  # [n, end]
                oc = F.scaled_dot_product_attention(qc, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=gqa)
            out[c.start:c.start + c.length] = oc.squeeze(0).transpose(0, 1)
        return out.view(t, self.num_heads * self.head_dim)
