"""An unquantized linear held in the smallest form that gives back its exact float32 values, for CPU decodes.

A decode step reads every weight once per token, so bytes are time. The LM head is the largest matrix a
quantized base leaves unquantized (SmolLM2-135M: 49,152 x 576, 113 MB in float32, 12.6 of the 50 ms of a decode
step on the 2-core AMD EPYC, 2026-12-02). Its values often need fewer bytes than float32 to be held exactly:

- ``int8``: every block of 32 values along a row is an int8 times one scale (what a GGUF Q8_0 tensor dequantizes
  to: the bundled SmolLM2's embedding/head is one), found by taking each block's largest magnitude as 127 scales
  and checking that every value is then an integer times that scale, exactly. 1.125 bytes a weight.
- ``bfloat16``: every value is a bfloat16 (an HF checkpoint saved in bfloat16). 2 bytes a weight.

The kernel (AVX2 + FMA) turns each back into float32 in registers and multiplies in float32, tokens in tiles of 4;
only the order of the float32 sums differs from ``F.linear`` (products of int8 and a scale are summed per block
and scaled once). Above ``KERNEL_ROWS`` tokens, chunks of rows are decoded into a scratch buffer for a matmul.
Where neither form is exact, or the kernel is unavailable, ``build`` returns None and the float32 weight serves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpp_library

# at most this many tokens run the kernel; more: decode chunks + matmul. Measured on the 2-core AMD EPYC (AVX2),
# 2026-12-02, SmolLM2's head [49152, 576]: 32 tokens 25.5 ms (int8) / 26.2 (bf16) against 72.9 / 43.8 decoding;
# 96 tokens 81 against 109 (bf16); 128 tokens 123 against 105 (int8): the kernel wins up to ~100
KERNEL_ROWS = 96
BLOCK = 32  # int8 values per scale (GGUF Q8_0's block)
CHUNK = 4096  # rows decoded at a time above KERNEL_ROWS

SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <immintrin.h>

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline __m256 load_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

static inline __m256 load_bf16(const uint16_t* p) {
  __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

// R tokens against one int8 row (K values, a scale per 32)
template <int R>
static inline void rows_i8(const float* x, int64_t K, const int8_t* q, const float* sc, float* out, int64_t N) {
  __m256 acc[R], b0[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t blk = 0; blk < K / 32; ++blk) {
    for (int r = 0; r < R; ++r) b0[r] = _mm256_setzero_ps();
    for (int g = 0; g < 4; ++g) {
      const int64_t j = blk * 32 + g * 8;
      const __m256 w = load_i8(q + j);
      for (int r = 0; r < R; ++r) b0[r] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * K + j), b0[r]);
    }
    const __m256 s = _mm256_set1_ps(sc[blk]);
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(b0[r], s, acc[r]);
  }
  for (int r = 0; r < R; ++r) out[r * N] = hsum(acc[r]);
}

template <int R>
static inline void rows_bf16(const float* x, int64_t K, const uint16_t* w, float* out, int64_t N) {
  __m256 a0[R], a1[R];
  for (int r = 0; r < R; ++r) { a0[r] = _mm256_setzero_ps(); a1[r] = _mm256_setzero_ps(); }
  for (int64_t j = 0; j < K; j += 16) {
    const __m256 w0 = load_bf16(w + j), w1 = load_bf16(w + j + 8);
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * K + j), a0[r]);
      a1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * K + j + 8), a1[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r * N] = hsum(_mm256_add_ps(a0[r], a1[r]));
}

template <typename F4, typename F3, typename F2, typename F1>
static void tiles(int64_t T, int64_t N, F4 f4, F3 f3, F2 f2, F1 f1) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      int64_t t = 0;
      for (; t + 4 <= T; t += 4) f4(t, n);
      switch (T - t) {
        case 3: f3(t, n); break;
        case 2: f2(t, n); break;
        case 1: f1(t, n); break;
        default: break;
      }
    }
  });
}

// x [T, K] f32; q [N, K] i8; scale [N, K / 32] f32 -> [T, N] f32
at::Tensor int8_linear(at::Tensor x, at::Tensor q, at::Tensor scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x [T, K] f32");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous() && q.size(1) == x.size(1), "q [N, K] i8");
  const int64_t T = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(K % 32 == 0 && scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == N * K / 32,
              "scale [N, K / 32] f32");
  auto out = at::empty({T, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
#define CALL(R) [&](int64_t t, int64_t n) { rows_i8<R>(xp + t * K, K, qp + n * K, sp + n * K / 32, op + t * N + n, N); }
  tiles(T, N, CALL(4), CALL(3), CALL(2), CALL(1));
#undef CALL
  return out;
}

// x [T, K] f32; w [N, K] bf16 -> [T, N] f32
at::Tensor bf16_linear(at::Tensor x, at::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x [T, K] f32");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.size(1) == x.size(1),
              "w [N, K] bf16");
  const int64_t T = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(K % 16 == 0, "K a multiple of 16");
  auto out = at::empty({T, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* op = out.data_ptr<float>();
#define CALL(R) [&](int64_t t, int64_t n) { rows_bf16<R>(xp + t * K, K, wp + n * K, op + t * N + n, N); }
  tiles(T, N, CALL(4), CALL(3), CALL(2), CALL(1));
#undef CALL
  return out;
}

TORCH_LIBRARY_FRAGMENT(LIBRARY, m) {
  m.def("int8_linear", &int8_linear);
  m.def("bf16_linear", &bf16_linear);
}
"""


def available() -> bool:
    return cpp_library.ops("compact") is not None


def why_not() -> str | None:
    return cpp_library.why_not("compact")


def as_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q [N, K] int8, scale [N, K / 32] float32) with q * scale == weight exactly, or None."""
    n, k = weight.shape
    if k % BLOCK:
        return None
    q_all = torch.empty(n, k, dtype=torch.int8)
    scales = torch.empty(n, k // BLOCK)
    for start in range(0, n, CHUNK):  # bounded temporaries
        w = weight[start:start + CHUNK].float().view(-1, k // BLOCK, BLOCK)
        amax = w.abs().amax(-1, keepdim=True)  # [rows, blocks, 1]
        scale = amax / 127
        q = torch.where(scale > 0, w / torch.where(scale > 0, scale, 1), 0).round()
        if not (q.abs() <= 127).all() or not torch.equal(q * scale, w):
            return None
        q_all[start:start + CHUNK] = q.view(-1, k).to(torch.int8)
        scales[start:start + CHUNK] = scale.view(-1, k // BLOCK)
    return q_all, scales


class CompactLinear:
    """weight [N, K] float32 held as int8 + scales or as bfloat16, when that form is exact."""

    @staticmethod
    def build(weight: torch.Tensor, bias: torch.Tensor | None = None) -> CompactLinear | None:
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2 or weight.shape[1] % 16:
            return None
        if not available():
            return None
        w = weight.detach()
        form = as_int8(w)
        if form is not None:
            return CompactLinear("int8", form[0], form[1], bias)
        bf = w.to(torch.bfloat16)
        if torch.equal(bf.float(), w):
            return CompactLinear("bfloat16", bf, None, bias)
        return None

    def __init__(self, form: str, values: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        self.form = form  # int8 or bfloat16
        self.values = values.contiguous()  # [N, K] int8 or bfloat16
        self.scale = None if scale is None else scale.contiguous()  # [N, K / 32] float32 (int8 only)
        self.bias = None if bias is None else bias.detach().float()  # [N]
        self.out_features, self.in_features = values.shape
        self.nbytes = self.values.nbytes + (0 if self.scale is None else self.scale.nbytes)
        self._ops = cpp_library.ops("compact")

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "int8":
            return self._ops.int8_linear(x, self.values, self.scale)
        return self._ops.bf16_linear(x, self.values)

    def _rows(self, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of the weight in float32, in the scratch buffer."""
        n = (end - start) * self.in_features
        out = cpp_library.scratch(n)[:n].view(end - start, self.in_features)
        if self.form == "int8":
            blocks = self.values[start:end].view(end - start, -1, BLOCK)
            torch.mul(blocks, self.scale[start:end].unsqueeze(-1), out=out.view(end - start, -1, BLOCK))
        else:
            out.copy_(self.values[start:end])
        return out

    def dequantized(self) -> torch.Tensor:
        return torch.cat([self._rows(s, min(s + CHUNK, self.out_features)).clone()
                          for s in range(0, self.out_features, CHUNK)])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] float32 -> [..., N] float32"""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).contiguous()
        if x2.shape[0] <= KERNEL_ROWS:
            y = self._kernel(x2)
        else:
            y = torch.cat([F.linear(x2, self._rows(s, min(s + CHUNK, self.out_features)))
                           for s in range(0, self.out_features, CHUNK)], dim=-1)
        if self.bias is not None:
            y += self.bias
        return y.view(*lead, self.out_features)
