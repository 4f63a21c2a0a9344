"""A decode step's whole layer stack as one C++ call (float32 on CPU, NF4 kernel linears, paged attention).

With the linears in integer arithmetic (nf4.py), a single stream's decode step of SmolLM2-135M spent as much in
Python and PyTorch's dispatch between the ops of ``Decoder._forward_fused`` (~15 calls and as many views a layer,
~95 us a layer) as in the 120 linears themselves (measured on the 2-core AMD EPYC, AVX2, 2026-12-02: forward 10.4
ms, linears 5.3 ms, LM head 1.2 ms). This op runs the same sequence of the same functions (the other parts'
C++, called directly: they are in the same translation unit) for every layer:

    x = rms_norm(h += y); qkv = nf4(x) + lora; rope(q, k); kv_write; o = paged_decode(q)
    y = nf4(o) + lora; x = rms_norm(h += y); gu = nf4(x) + lora; y = nf4(silu(gate) * up) + lora

so the values are those of the Python loop (checked to the bit in the tests). It serves steps whose rows are
all decodes with a LoRA batch the small-rows op takes (``delta.SMALL_ROWS``) or none; any other step runs the
Python loop. Built only with the parts it calls (nf4, fused, paged_attention, lora_delta); ``LORAPLEX_STACK_OP=0``
turns it off.
"""

from __future__ import annotations

import torch

from . import cpp_library

SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <torch/library.h>
#include <optional>
#include <vector>

// h [T, H] f32: the residual stream (updated in place; returned with the last layer's output added);
// positions, slot_mapping [T] i64; cos, sin [max_pos, hd]; tables [T, NB], lens [T] i64 (every row a decode);
// norms [2 L] ([H] f32: each layer's input and post-attention norm); per projection group, 4 a layer (qkv, o,
// gate_up, down): codes, absmax, lut, bias (no elements: none), outs (N); k_cache, v_cache [L, KV, blocks, bs, hd];
// LoRA: lora_a [4 L] ([slots, in, n R]) or empty: none this step; lora_b: the groups' members' [slots, R, out] in
// order, lora_members [4 L] how many each group has, lora_offsets their first columns; rows, slots, weights, seg_len,
// rank: the step's LoraBatch (as lora_delta takes them)
at::Tensor decode_stack(at::Tensor h, at::Tensor positions, at::Tensor cos, at::Tensor sin, at::Tensor slot_mapping,
                        at::Tensor tables, at::Tensor lens, double scaling, double eps, int64_t heads,
                        int64_t kv_heads, int64_t hd, std::vector<at::Tensor> norms, std::vector<at::Tensor> codes,
                        std::vector<at::Tensor> absmax, std::vector<at::Tensor> luts, std::vector<at::Tensor> biases,
                        std::vector<int64_t> outs, at::Tensor k_cache, at::Tensor v_cache,
                        std::vector<at::Tensor> lora_a, std::vector<at::Tensor> lora_b,
                        std::vector<int64_t> lora_members, std::vector<int64_t> lora_offsets,
                        std::optional<at::Tensor> rows, std::optional<at::Tensor> slots,
                        std::optional<at::Tensor> weights, int64_t seg_len, int64_t rank) {
  const int64_t L = static_cast<int64_t>(norms.size()) / 2, G = 4 * L;
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kFloat && h.is_contiguous(), "h [T, H] f32 contiguous");
  TORCH_CHECK(k_cache.dim() == 5 && k_cache.size(0) == L && v_cache.sizes() == k_cache.sizes() &&
              k_cache.size(1) == kv_heads && k_cache.size(4) == hd, "caches [L, KV, blocks, bs, hd]");
  TORCH_CHECK(static_cast<int64_t>(codes.size()) == G && static_cast<int64_t>(absmax.size()) == G &&
              static_cast<int64_t>(luts.size()) == G && static_cast<int64_t>(biases.size()) == G &&
              static_cast<int64_t>(outs.size()) == G, "per-layer lists");
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && hd > 0, "heads");
  const int64_t T = h.size(0), nq = heads * hd, nk = kv_heads * hd;
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == T && lens.numel() == T, "a decode row for every token");
  const bool lora = !lora_a.empty();
  std::vector<int64_t> first_b(G + 1, 0);  // group g's members are lora_b[first_b[g] .. first_b[g + 1])
  if (lora) {
    TORCH_CHECK(static_cast<int64_t>(lora_a.size()) == G && static_cast<int64_t>(lora_members.size()) == G &&
                rows.has_value() && slots.has_value(), "LoRA lists");
    for (int64_t g = 0; g < G; ++g) first_b[g + 1] = first_b[g] + lora_members[g];
    TORCH_CHECK(static_cast<int64_t>(lora_b.size()) == first_b[G] &&
                static_cast<int64_t>(lora_offsets.size()) == first_b[G], "LoRA members");
  }
  auto project = [&](int64_t g, const at::Tensor& x) {
    at::Tensor y = loraplex_nf4::nf4_linear(x, codes[g], absmax[g], luts[g], outs[g]);
    if (biases[g].numel()) y.add_(biases[g]);
    if (lora && lora_a[g].numel()) {
      std::vector<at::Tensor> bs(lora_b.begin() + first_b[g], lora_b.begin() + first_b[g + 1]);
      std::vector<int64_t> off(lora_offsets.begin() + first_b[g], lora_offsets.begin() + first_b[g + 1]);
      loraplex_lora_delta::lora_delta(x, lora_a[g], bs, {y}, off, *rows, *slots, weights, seg_len, rank);
    }
    return y;
  };
  std::optional<at::Tensor> y;
  for (int64_t i = 0; i < L; ++i) {
    const at::Tensor kp = k_cache.select(0, i), vp = v_cache.select(0, i);  // [KV, blocks, bs, hd]
    at::Tensor x = loraplex_fused::add_rms_norm(h, y, norms[2 * i], eps);
    at::Tensor qkv = project(4 * i, x);  // [T, nq + 2 nk]
    TORCH_CHECK(qkv.size(1) == nq + 2 * nk, "qkv columns");
    loraplex_fused::rope(qkv, positions, cos, sin, heads + kv_heads, hd);
    const int64_t slots_n = kp.size(1) * kp.size(2);
    loraplex_fused::kv_write(kp.view({kv_heads, slots_n, hd}), vp.view({kv_heads, slots_n, hd}), slot_mapping,
                             qkv.narrow(1, nq, nk).view({T, kv_heads, hd}),
                             qkv.narrow(1, nq + nk, nk).view({T, kv_heads, hd}));
    at::Tensor q = qkv.narrow(1, 0, nq).contiguous().view({T, kv_heads, heads / kv_heads, hd});
    at::Tensor o = loraplex_paged_attention::paged_decode(q, kp, vp, tables, lens, scaling).view({T, nq});
    y = project(4 * i + 1, o);
    x = loraplex_fused::add_rms_norm(h, y, norms[2 * i + 1], eps);
    at::Tensor gu = project(4 * i + 2, x);
    y = project(4 * i + 3, loraplex_fused::silu_mul(gu));
  }
  if (y.has_value()) h.add_(*y);
  return h;
}

TORCH_LIBRARY_FRAGMENT(LIBRARY, m) { m.def("decode_stack", &decode_stack); }
"""

GROUPS = ("qkv", "o", "gate_up", "down")  # the order of the op's per-layer lists


def ops():
    """The op namespace where the stack op is built, else None."""
    return cpp_library.ops("stack")


def why_not() -> str | None:
    return cpp_library.why_not("stack")
