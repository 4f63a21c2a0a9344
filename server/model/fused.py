"""The elementwise work of a decoder layer as a few C++ ops, on CPU in float32.

Once the NF4 kernel made a single stream's linears cheap (12 of a 37 ms decode step of SmolLM2-135M on the 2-core
AMD EPYC, 2026-12-02), most of the step was small PyTorch ops around them, each paying its dispatch: per layer two
RMSNorms of ~7 ops (6.5 ms a step), the rotary embedding of q and k (~14 ops, 3.3 ms), the cache write (two
index_puts, 1.8 ms), silu(gate) * up (1.4 ms). Here each is one op:

- ``add_rms_norm``: ``h += y`` (the residual; skipped when y is undefined) then RMSNorm(h) * weight, as
  transformers' LlamaRMSNorm computes it in float32 (mean of squares, rsqrt(+ eps)), into a new tensor;
- ``rope``: rotates, in place, the first ``heads`` heads of each row of the fused q/k/v output (q's and k's),
  ``x * cos + rotate_half(x) * sin`` at each token's position;
- ``silu_mul``: silu(gate) * up from the fused [gate | up] output;
- ``kv_write``: each token's keys and values into its pool slot.

Only the order of the float32 sums in the norm differs from the PyTorch path (tests compare both).
"""

from __future__ import annotations

import torch

from . import cpp_library

SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <optional>

// h [T, H] f32 (h += y when y is given); w [H] -> RMSNorm(h) * w [T, H]
at::Tensor add_rms_norm(at::Tensor h, std::optional<at::Tensor> y, at::Tensor w, double eps) {
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kFloat && h.is_contiguous(), "h [T, H] f32 contiguous");
  const int64_t T = h.size(0), H = h.size(1);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == H, "w [H] f32");
  const float* yp = nullptr;
  int64_t ys = 0;
  if (y.has_value()) {
    TORCH_CHECK(y->scalar_type() == at::kFloat && y->dim() == 2 && y->size(0) == T && y->size(1) == H &&
                y->stride(1) == 1, "y [T, H] f32");
    yp = y->data_ptr<float>();
    ys = y->stride(0);
  }
  auto out = at::empty({T, H}, h.options());
  float* hp = h.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      float* hr = hp + t * H;
      if (yp) {
        const float* yr = yp + t * ys;
#pragma omp simd
        for (int64_t i = 0; i < H; ++i) hr[i] += yr[i];
      }
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < H; ++i) ss += hr[i] * hr[i];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + static_cast<float>(eps));
      float* orow = op + t * H;
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) orow[i] = wp[i] * (hr[i] * inv);
    }
  });
  return out;
}

// x [T, >= heads * hd] f32 (row stride any, columns contiguous): its first heads * hd columns rotated in place;
// positions [T] i64; cos, sin [max_pos, hd] f32
void rope(at::Tensor x, at::Tensor positions, at::Tensor cos, at::Tensor sin, int64_t heads, int64_t hd) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1 && x.size(1) >= heads * hd, "x");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
              sin.is_contiguous() && cos.size(1) == hd && sin.sizes() == cos.sizes() && hd % 2 == 0, "cos, sin");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == x.size(0), "positions [T] i64");
  const int64_t T = x.size(0), rs = x.stride(0), half = hd / 2, P = cos.size(0);
  float* xp = x.data_ptr<float>();
  const int64_t* pp = positions.contiguous().data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(pp[t] >= 0 && pp[t] < P, "position out of range");
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float* c = cp + pp[t] * hd;
      const float* s = sp + pp[t] * hd;
      for (int64_t h = 0; h < heads; ++h) {
        float* v = xp + t * rs + h * hd;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float a = v[i], bb = v[i + half];
          v[i] = a * c[i] - bb * s[i];
          v[i + half] = bb * c[i + half] + a * s[i + half];
        }
      }
    }
  });
}

// gu [T, 2 * I] f32 ([gate | up], row stride any) -> silu(gate) * up [T, I]
at::Tensor silu_mul(at::Tensor gu) {
  TORCH_CHECK(gu.dim() == 2 && gu.scalar_type() == at::kFloat && gu.stride(1) == 1 && gu.size(1) % 2 == 0, "gu");
  const int64_t T = gu.size(0), I = gu.size(1) / 2, rs = gu.stride(0);
  auto out = at::empty({T, I}, gu.options());
  const float* gp = gu.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float* g = gp + t * rs;
      const float* u = g + I;
      float* o = op + t * I;
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
  });
  return out;
}

// k_pool, v_pool [KV, slots, hd] f32 (one layer, slots = blocks * block_size); slot_mapping [T] i64;
// k, v [T, KV, hd] f32 (row and head strides any, hd contiguous)
void kv_write(at::Tensor k_pool, at::Tensor v_pool, at::Tensor slot_mapping, at::Tensor k, at::Tensor v) {
  TORCH_CHECK(k_pool.scalar_type() == at::kFloat && k_pool.is_contiguous() && v_pool.is_contiguous() &&
              v_pool.sizes() == k_pool.sizes() && v_pool.scalar_type() == at::kFloat, "pools");
  const int64_t KV = k_pool.size(0), S = k_pool.size(1), HD = k_pool.size(2), T = slot_mapping.numel();
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.size(0) == T && v.size(0) == T && k.size(1) == KV && v.size(1) == KV &&
              k.size(2) == HD && v.size(2) == HD && k.stride(2) == 1 && v.stride(2) == 1 &&
              k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat, "k, v [T, KV, hd] f32");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, "slot_mapping i64");
  auto sm = slot_mapping.contiguous();
  const int64_t* sp = sm.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(sp[t] >= 0 && sp[t] < S, "slot out of range");
  float* kp = k_pool.data_ptr<float>();
  float* vp = v_pool.data_ptr<float>();
  const float* ks = k.data_ptr<float>();
  const float* vs = v.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < KV; ++h) {
      std::copy_n(ks + t * k.stride(0) + h * k.stride(1), HD, kp + (h * S + sp[t]) * HD);
      std::copy_n(vs + t * v.stride(0) + h * v.stride(1), HD, vp + (h * S + sp[t]) * HD);
    }
}

TORCH_LIBRARY_FRAGMENT(LIBRARY, m) {
  m.def("add_rms_norm", &add_rms_norm);
  m.def("rope", &rope);
  m.def("silu_mul", &silu_mul);
  m.def("kv_write", &kv_write);
}
"""


def ops():
    """The op namespace (None where the library cannot be built)."""
    return cpp_library.ops("fused")


def why_not() -> str | None:
    return cpp_library.why_not("fused")
