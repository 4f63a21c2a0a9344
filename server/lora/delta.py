"""The LoRA delta of a few tokens in one C++ call, on CPU in float32.

A decode step of one request spends little on its LoRA FLOPs (rank 16 over SmolLM2's seven projections is
~1 MFLOP a layer) and a lot on dispatch: the batched path (``LoraBank.add_delta``: segments, two ``bmm``, a
slice, a cast and an in-place add per member) is ~80 ops a layer, and measured on the 2-core AMD EPYC (AVX2,
2026-12-02, SmolLM2-135M + one r=16 adapter, one stream) they took the adapter's cost to +28% of the base's
step. For at most ``SMALL_ROWS`` padded rows this op does a group's whole delta: ``h = x[row] @ a[slot]``
for every padded row, then ``y[row, member] += weight * h[member's ranks] @ b_member[slot]`` for each member,
in float32 like the batched path (only the order of the sums differs). The rows, slots, padding and weights
are the ``LoraBatch``'s, unchanged: a pad repeats its segment's first row with weight 0 (see bank.py).
The expand is split over output columns (rows repeat: pads, mixtures), so no two threads add into one value.
"""

from __future__ import annotations

import torch

from ..model import cpp_library

SMALL_ROWS = 16  # padded rows up to which the op runs (beyond, the batched bmm path is as fast)

SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <algorithm>
#include <optional>
#include <vector>

// x [T, in] f32; a [slots, in, n * R] f32; bs: n x [slots, R, out_p] f32; ys: n x [T, out_p] (or one [T, sum out],
// offsets giving each member's first column); rows [P] i64 (padded rows: P = S * L); slots [S] i64;
// weights [P] f32 or none; r: the step's largest rank (columns k < r of each member's R are read)
void lora_delta(at::Tensor x, at::Tensor a, std::vector<at::Tensor> bs, std::vector<at::Tensor> ys,
                std::vector<int64_t> offsets, at::Tensor rows, at::Tensor slots, std::optional<at::Tensor> weights,
                int64_t seg_len, int64_t r) {
  const int64_t n = static_cast<int64_t>(bs.size());
  const int64_t P = rows.numel(), S = slots.numel(), in = x.size(1), nR = a.size(2), R = nR / n;
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.stride(1) == 1 && a.scalar_type() == at::kFloat && a.is_contiguous(),
              "float32 x and a");
  TORCH_CHECK(a.size(1) == in && nR == n * R && r <= R && P == S * seg_len, "shapes");
  TORCH_CHECK(ys.size() == 1 || static_cast<int64_t>(ys.size()) == n, "one fused output or one per member");
  TORCH_CHECK(static_cast<int64_t>(offsets.size()) == n, "an offset per member");
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  if (weights.has_value())
    TORCH_CHECK(weights->scalar_type() == at::kFloat && weights->is_contiguous() && weights->numel() == P,
                "a float32 weight per padded row");
  const float* wp = weights.has_value() ? weights->data_ptr<float>() : nullptr;
  for (int64_t i = 0; i < P; ++i) TORCH_CHECK(rp[i] >= 0 && rp[i] < x.size(0), "row out of range");
  for (int64_t s = 0; s < S; ++s) TORCH_CHECK(sp[s] >= 0 && sp[s] < a.size(0), "slot out of range");
  // The shrink in pieces of KC input features, so that one row's shrink (a single stream: P = 1) runs on every
  // thread: each piece sums its features in order, then the pieces are added in order (the same sums whatever
  // the thread count).
  constexpr int64_t KC = 64;
  const int64_t C = (in + KC - 1) / KC;
  std::vector<float> part(P * C * nR, 0.f);
  const float* xp = x.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const int64_t xs = x.stride(0);
  at::parallel_for(0, P * C, std::max<int64_t>(1, 16384 / (KC * nR)), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t i = t / C, k0 = (t % C) * KC, k1 = std::min(in, k0 + KC);
      const float* xr = xp + rp[i] * xs;
      const float* as = ap + sp[i / seg_len] * in * nR;
      float* hi = part.data() + t * nR;
      for (int64_t k = k0; k < k1; ++k) {
        const float xv = xr[k];
        const float* arow = as + k * nR;
#pragma omp simd
        for (int64_t c = 0; c < nR; ++c) hi[c] += xv * arow[c];
      }
    }
  });
  std::vector<float> h(P * nR, 0.f);
  for (int64_t i = 0; i < P; ++i)
    for (int64_t c = 0; c < C; ++c) {
      const float* pc = part.data() + (i * C + c) * nR;
      float* hi = h.data() + i * nR;
      for (int64_t col = 0; col < nR; ++col) hi[col] += pc[col];
    }
  // The expand: every member's output columns in one range split over the threads (one parallel region a group).
  std::vector<int64_t> first(n + 1, 0);  // member p's columns are [first[p], first[p + 1]) of the range
  for (int64_t p = 0; p < n; ++p) {
    const at::Tensor& b = bs[p];
    const at::Tensor& y = ys.size() == 1 ? ys[0] : ys[p];
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.is_contiguous() && b.dim() == 3 && b.size(1) == R,
                "b [slots, R, out] f32");
    TORCH_CHECK(y.scalar_type() == at::kFloat && y.dim() == 2 && y.stride(1) == 1 && y.size(0) == x.size(0),
                "float32 output rows");
    const int64_t col0 = ys.size() == 1 ? offsets[p] : 0;
    TORCH_CHECK(col0 >= 0 && col0 + b.size(2) <= y.size(1) && b.size(0) == a.size(0), "output columns");
    first[p + 1] = first[p] + b.size(2);
  }
  at::parallel_for(0, first[n], std::max<int64_t>(64, 4096 / std::max<int64_t>(1, P * r)), [&](int64_t g0, int64_t g1) {
    for (int64_t p = 0; p < n; ++p) {
      const int64_t j0 = std::max(g0, first[p]) - first[p], j1 = std::min(g1, first[p + 1]) - first[p];
      if (j0 >= j1) continue;
      const at::Tensor& y = ys.size() == 1 ? ys[0] : ys[p];
      const int64_t out = first[p + 1] - first[p], col0 = ys.size() == 1 ? offsets[p] : 0, ystride = y.stride(0);
      const float* bp = bs[p].data_ptr<float>();
      float* yp = y.data_ptr<float>();
      for (int64_t i = 0; i < P; ++i) {
        const float w = wp ? wp[i] : 1.f;
        const float* hi = h.data() + i * nR + p * R;
        const float* bsl = bp + sp[i / seg_len] * R * out;
        float* yr = yp + rp[i] * ystride + col0;
        for (int64_t k = 0; k < r; ++k) {
          const float c = w * hi[k];
          const float* brow = bsl + k * out;
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) yr[j] += c * brow[j];
        }
      }
    }
  });
}

TORCH_LIBRARY_FRAGMENT(LIBRARY, m) { m.def("lora_delta", &lora_delta); }
"""


def available() -> bool:
    return cpp_library.ops("lora_delta") is not None


def why_not() -> str | None:
    return cpp_library.why_not("lora_delta")


def op():
    """The op itself (None where it is not built): ``op()(x, a, bs, ys, offsets, rows, slots, weights, seg_len,
    rank)``, as ``add``; the bank calls it directly (each Python call between costs ~1 us a group)."""
    ops = cpp_library.ops("lora_delta")
    return None if ops is None else ops.lora_delta


def add(x: torch.Tensor, a: torch.Tensor, bs: list[torch.Tensor], ys: list[torch.Tensor], offsets: list[int],
        rows: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor | None, seg_len: int, rank: int) -> None:
    """Add the group's delta into ``ys`` in place (see the module doc for the shapes)."""
    cpp_library.ops("lora_delta").lora_delta(x, a, bs, ys, offsets, rows, slots, weights, seg_len, rank)
