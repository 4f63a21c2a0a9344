"""Decode attention that reads keys and values straight from the paged KV pool, on CPU.

A decode step attends each running sequence's one new query to its whole context. Gathering the context's
blocks into a contiguous tensor first (``KVCache.gather``, then SDPA) copies every running sequence's keys and
values once per layer per step: 32 sequences of 1,560 tokens are 2.3 GB a step for SmolLM2-135M in fp32, which
is what the step costs on a 2-core CPU. This kernel walks each sequence's block table instead and reads every
key and value once, in place (as vLLM's CPU paged-attention kernel does): one task per (sequence, KV head), the
heads sharing that KV head done together, an online softmax in fp32 over the blocks.

It is C++ built on first use with the other kernels (cpp_library.py: the machine's compiler, cached per CPU). Without a compiler, or on CUDA, the decoder gathers and calls SDPA as before;
``available()`` says which, and the start-up log names it.
"""

from __future__ import annotations

import torch

from . import cpp_library

SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

template <typename T>
static void paged_decode_impl(const T* q, const T* kc, const T* vc, const int64_t* tables, const int64_t* lens, T* out,
                              int64_t D, int64_t KV, int64_t G, int64_t HD, int64_t NB, int64_t BLOCKS, int64_t BS,
                              float scale) {
  at::parallel_for(0, D * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * HD), acc(G * HD), s(BS), m(G), l(G), kf(BS * HD), vf(BS * HD);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t d = idx / KV, h = idx % KV;
      const T* qp = q + (d * KV + h) * G * HD;
      for (int64_t i = 0; i < G * HD; ++i) qf[i] = static_cast<float>(qp[i]) * scale;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      const int64_t len = lens[d];
      for (int64_t j = 0; j * BS < len; ++j) {
        const int64_t blk = tables[d * NB + j];
        const int64_t n = std::min(BS, len - j * BS);
        const T* kb = kc + (h * BLOCKS + blk) * BS * HD;
        const T* vb = vc + (h * BLOCKS + blk) * BS * HD;
        const float* kp;
        const float* vp;
        if constexpr (std::is_same_v<T, float>) {
          kp = kb;
          vp = vb;
        } else {
          for (int64_t i = 0; i < n * HD; ++i) { kf[i] = static_cast<float>(kb[i]); vf[i] = static_cast<float>(vb[i]); }
          kp = kf.data();
          vp = vf.data();
        }
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = &qf[g * HD];
          float mx = m[g];
          for (int64_t t = 0; t < n; ++t) {
            const float* kt = kp + t * HD;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t e = 0; e < HD; ++e) dot += qg[e] * kt[e];
            s[t] = dot;
            mx = std::max(mx, dot);
          }
          const float corr = std::exp(m[g] - mx);  // 0 on the first block (m = -inf)
          float* ag = &acc[g * HD];
          float sum = l[g] * corr;
#pragma omp simd
          for (int64_t e = 0; e < HD; ++e) ag[e] *= corr;
          for (int64_t t = 0; t < n; ++t) {
            const float p = std::exp(s[t] - mx);
            sum += p;
            const float* vt = vp + t * HD;
#pragma omp simd
            for (int64_t e = 0; e < HD; ++e) ag[e] += p * vt[e];
          }
          m[g] = mx;
          l[g] = sum;
        }
      }
      T* op = out + (d * KV + h) * G * HD;
      for (int64_t g = 0; g < G; ++g) {
        const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
        for (int64_t e = 0; e < HD; ++e) op[g * HD + e] = static_cast<T>(acc[g * HD + e] * inv);
      }
    }
  });
}

// q [D, KV, G, HD]; k_pool, v_pool [KV, BLOCKS, BS, HD] (one layer of the pool); tables [D, NB]; lens [D]
at::Tensor paged_decode(at::Tensor q, at::Tensor k_pool, at::Tensor v_pool, at::Tensor tables, at::Tensor lens,
                        double scale) {
  TORCH_CHECK(q.is_contiguous() && k_pool.is_contiguous() && v_pool.is_contiguous(), "contiguous inputs");
  TORCH_CHECK(tables.scalar_type() == at::kLong && lens.scalar_type() == at::kLong, "int64 tables and lens");
  TORCH_CHECK(k_pool.scalar_type() == q.scalar_type() && v_pool.scalar_type() == q.scalar_type(), "one dtype");
  auto tc = tables.contiguous();
  auto lc = lens.contiguous();
  const int64_t D = q.size(0), KV = q.size(1), G = q.size(2), HD = q.size(3);
  const int64_t BLOCKS = k_pool.size(1), BS = k_pool.size(2), NB = tc.size(1);
  TORCH_CHECK(k_pool.size(0) == KV && k_pool.size(3) == HD && lc.size(0) == D && tc.size(0) == D, "shapes");
  const int64_t* tp = tc.data_ptr<int64_t>();
  const int64_t* lp = lc.data_ptr<int64_t>();
  for (int64_t d = 0; d < D; ++d) {
    TORCH_CHECK(lp[d] >= 0 && lp[d] <= NB * BS, "context length out of range");
    for (int64_t b = 0; b < (lp[d] + BS - 1) / BS; ++b) TORCH_CHECK(tp[d * NB + b] >= 0 && tp[d * NB + b] < BLOCKS, "block out of range");
  }
  auto out = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    paged_decode_impl<scalar_t>(q.data_ptr<scalar_t>(), k_pool.data_ptr<scalar_t>(), v_pool.data_ptr<scalar_t>(),
                                tc.data_ptr<int64_t>(), lc.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), D, KV, G,
                                HD, NB, BLOCKS, BS, static_cast<float>(scale));
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(LIBRARY, m) { m.def("paged_decode", &paged_decode); }
"""


def available(device: torch.device | str) -> bool:
    """Whether decodes on ``device`` read the pool in place (builds the kernel on first call, on CPU)."""
    return torch.device(device).type == "cpu" and cpp_library.ops("paged_attention") is not None


def why_not() -> str | None:
    return cpp_library.why_not("paged_attention")


def paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                 lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one query per head over each sequence's context, read in place from the pool.

    q [D, kv, group, hd] (the heads sharing a KV head together); k_pool, v_pool [kv, blocks, block_size, hd] (one
    layer); tables [D, nb] int64 block tables; lens [D] int64 context lengths (positions 0..len-1 attended).
    Returns [D, kv, group, hd]."""
    return cpp_library.ops("paged_attention").paged_decode(q.contiguous(), k_pool, v_pool, tables, lens, float(scale))
