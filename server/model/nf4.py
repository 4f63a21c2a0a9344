"""Linears over NF4 weights computed by our own CPU kernel, from the 4-bit codes themselves.

bitsandbytes' CPU 4-bit matmul is fast only with AVX-512; without it (AMD EPYC, AVX2) the served default held
the NF4 values dequantized in float32 (4 bytes a weight), and one decode step read 0.5 GB of weights. This module
keeps the codes (half a byte a weight, plus a float32 scale per 64) and has two paths:

- up to ``KERNEL_ROWS`` tokens (decodes, a small batch): an integer kernel. The 16-entry code book is held as int16
  (each value times 16383 / its largest magnitude, rounded: within 3e-5 of the block's absmax of the NF4 value) and
  looked up 32 codes at a time by two byte shuffles; each block of 64 activations of a token is scaled to int16 the
  same way; int16 x int16 products are summed in int32 by ``vpmaddwd`` (8 products of at most 16383^2 a lane: no
  overflow) and each block's sum goes to float32 times its absmax and the activations' scale. Outputs are within
  ``KERNEL_ERROR`` of the row's largest output of the exact float64 product (8.8e-5 the worst seen over SmolLM2's
  shapes, randn inputs), finer than float16 arithmetic (~5e-4) and bfloat16's (~4e-3, the AVX-512 default). A block holding an inf or NaN makes its token's outputs NaN. It replaced a float32 kernel (table
  lookup by two AVX2 permutes and a blend, then FMAs) that the shuffles held to ~1.8 weights a cycle: measured on
  the 2-core AMD EPYC (AVX2), 2026-12-02, SmolLM2-135M, one decode step's 120 linears 12.2 ms -> 5.3 ms.
- more tokens (prefill chunks, full batches): the layer's weights are decoded into a reused float32 scratch
  buffer (``dequantize_4bit``'s float32 values bit for bit, checked in the tests) and one dense float32 matmul runs
  (the decoding costs ~0.5 ms a layer, against seconds of prefill).

Either way the weights are the ones a QLoRA adapter was trained against; only the arithmetic differs.
Built with the other kernels (cpp_library.py; needs AVX2 and FMA; elsewhere bitsandbytes' own path serves). The
codes are repacked at load so that a group of 16 weights is 8 bytes, byte j holding weight j (low nibble) and
weight j + 8 (high).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpp_library

KERNEL_ERROR = 2e-4  # the int16 kernel's outputs are within this fraction of the row's largest output (5e-5 seen)
KERNEL_ROWS = 48  # at most this many tokens run the kernel (measured faster up to 48); more: decode + one matmul
BLOCK = 64  # weights per absmax (bitsandbytes' default blocksize, what the loader quantizes with)

SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>
#include <limits>

// value of each code: the table's entry (two permutes of 8 and a blend on the index's bit 3)
static inline __m256 lookup(__m256i idx, __m256 lo, __m256 hi) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

static inline float hsum_max(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Each block of 64 activations of a token as int16 (|q| <= QMAX) and its largest magnitude f: x ~= q * f / QMAX.
// A block with an inf or NaN gets f = NaN (its token's outputs are NaN).
static constexpr float QMAX = 16383.f;  // 8 products of two such int16 fit an int32: 8 * 16383^2 < 2^31

static void quantize(const float* x, int64_t n_blocks, int16_t* q, float* f) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t b = 0; b < n_blocks; ++b, x += 64, q += 64) {
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < 64; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
    float mx = hsum_max(m);
    bool finite = std::isfinite(mx);
    for (int i = 0; i < 64; ++i) finite = finite && std::isfinite(x[i]);  // max_ps drops NaNs
    if (!finite || mx == 0.f) {
      std::memset(q, 0, 64 * sizeof(int16_t));
      f[b] = finite ? 0.f : std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const __m256 inv = _mm256_set1_ps(QMAX / mx);
    for (int i = 0; i < 64; i += 16) {
      __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), inv));
      __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), inv));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i),
                          _mm256_permute4x64_epi64(_mm256_packs_epi32(a, c), 0xD8));  // packs works per lane
    }
    f[b] = mx;
  }
}

// A lane's int32 sum plus the two int16 products of its pair: one vpdpwssd where the CPU has AVX512-VNNI (on
// 256-bit registers, which it gives 32 of: tiles of 8 tokens fit), else vpmaddwd then vpaddd (16 registers: tiles
// of 4). The same int32 either way (|products| <= 16383^2: no saturation in vpmaddwd, wrapping adds in both), and
// each token's sums run in the same order whatever its tile: outputs do not depend on the path or the tiling.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
static constexpr int TILE = 8;
static inline __m256i dot_add(__m256i s, __m256i w, __m256i x) { return _mm256_dpwssd_epi32(s, w, x); }
#else
static constexpr int TILE = 4;
static inline __m256i dot_add(__m256i s, __m256i w, __m256i x) { return _mm256_add_epi32(s, _mm256_madd_epi16(w, x)); }
#endif

// R tokens (rows of q, K apart; their factors f, K / 64 apart) against one weight row: its codes (K / 2 bytes)
// and absmax (K / 64). Per 32 weights (16 bytes, byte j < 8 holding weights j and j + 8, byte 8 + j weights
// 16 + j and 24 + j, low nibble first): the nibbles in 32 bytes (low nibbles in the lower lane), the int16 table
// looked up by two byte shuffles (low and high bytes) and interleaved back, which yields weights 0-15 and 16-31
// in order; then int16 products summed in pairs (vpmaddwd) into int32, once per block to float.
template <int R>
static inline void rows(const int16_t* q, const float* f, int64_t K, const uint8_t* codes, const float* am,
                        __m256i tlo, __m256i thi, float unit, float* out, int64_t N) {
  const __m256i m15 = _mm256_set1_epi8(15);
  __m256 acc[R];
  __m256i s[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t blk = 0; blk < K / 64; ++blk) {
    for (int r = 0; r < R; ++r) s[r] = _mm256_setzero_si256();
    for (int h = 0; h < 2; ++h) {
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + blk * 32 + h * 16));
      const __m256i v = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(c, 4), c), m15);
      const __m256i lo = _mm256_shuffle_epi8(tlo, v), hi = _mm256_shuffle_epi8(thi, v);
      const __m256i w0 = _mm256_unpacklo_epi8(lo, hi), w1 = _mm256_unpackhi_epi8(lo, hi);
      const int64_t j = blk * 64 + h * 32;
      for (int r = 0; r < R; ++r) {
        const __m256i* x = reinterpret_cast<const __m256i*>(q + r * K + j);
        s[r] = dot_add(s[r], w0, _mm256_loadu_si256(x));
        s[r] = dot_add(s[r], w1, _mm256_loadu_si256(x + 1));
      }
    }
    for (int r = 0; r < R; ++r)
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r]), _mm256_set1_ps(am[blk] * f[r * (K / 64) + blk]), acc[r]);
  }
  for (int r = 0; r < R; ++r) out[r * N] = hsum(acc[r]) * unit;
}

static void check(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& lut, int64_t N, int64_t K) {
  TORCH_CHECK(K > 0 && K % 64 == 0 && N > 0, "K a multiple of 64, N > 0");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.numel() == N * K / 2, "codes [N*K/2] u8");
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous() && absmax.numel() == N * K / 64,
              "absmax [N*K/64] f32");
  TORCH_CHECK(lut.scalar_type() == at::kFloat && lut.is_contiguous() && lut.numel() == 16, "lut [16] f32");
}

// x [T, K] f32; codes [N * K / 2] u8; absmax [N * K / 64] f32; lut [16] f32 -> [T, N] f32
at::Tensor nf4_linear(at::Tensor x, at::Tensor codes, at::Tensor absmax, at::Tensor lut, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x [T, K] f32 contiguous");
  const int64_t T = x.size(0), K = x.size(1);
  check(codes, absmax, lut, N, K);
  auto out = at::empty({T, N}, x.options());
  const float* lp = lut.data_ptr<float>();
  float wscale = 0.f;  // the int16 table: each code's value times wscale, rounded (|entry| <= QMAX)
  for (int i = 0; i < 16; ++i) {
    TORCH_CHECK(std::isfinite(lp[i]), "lut: finite values");
    wscale = std::max(wscale, std::fabs(lp[i]));
  }
  TORCH_CHECK(wscale > 0.f, "lut: not all zero");
  wscale = QMAX / wscale;
  alignas(32) uint8_t tab[2][32];  // low and high bytes of each entry, repeated in both lanes
  for (int i = 0; i < 32; ++i) {
    const uint16_t e = static_cast<uint16_t>(static_cast<int16_t>(std::nearbyint(lp[i % 16] * wscale)));
    tab[0][i] = e & 255;
    tab[1][i] = e >> 8;
  }
  const int64_t nb = K / 64;
  auto qx = at::empty({T * K}, x.options().dtype(at::kShort));
  auto fx = at::empty({T * nb}, x.options());
  int16_t* qp = qx.data_ptr<int16_t>();
  float* fp = fx.data_ptr<float>();
  quantize(x.data_ptr<float>(), T * nb, qp, fp);
  const float unit = 1.f / (QMAX * wscale);  // a product of table entry and int16 activation, scaled back
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* ap = absmax.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 8, [&](int64_t begin, int64_t end) {
    const __m256i tlo = _mm256_load_si256(reinterpret_cast<const __m256i*>(tab[0]));
    const __m256i thi = _mm256_load_si256(reinterpret_cast<const __m256i*>(tab[1]));
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* c = cp + n * K / 2;
      const float* a = ap + n * nb;
      int64_t t = 0;
      for (; t + TILE <= T; t += TILE) rows<TILE>(qp + t * K, fp + t * nb, K, c, a, tlo, thi, unit, op + t * N + n, N);
      if (TILE > 4 && t + 4 <= T) {
        rows<4>(qp + t * K, fp + t * nb, K, c, a, tlo, thi, unit, op + t * N + n, N);
        t += 4;
      }
      switch (T - t) {
        case 3: rows<3>(qp + t * K, fp + t * nb, K, c, a, tlo, thi, unit, op + t * N + n, N); break;
        case 2: rows<2>(qp + t * K, fp + t * nb, K, c, a, tlo, thi, unit, op + t * N + n, N); break;
        case 1: rows<1>(qp + t * K, fp + t * nb, K, c, a, tlo, thi, unit, op + t * N + n, N); break;
        default: break;
      }
    }
  });
  return out;
}

// the weights' float32 values [N, K], written into the first N * K floats of buf
at::Tensor nf4_dequant(at::Tensor codes, at::Tensor absmax, at::Tensor lut, at::Tensor buf, int64_t N, int64_t K) {
  check(codes, absmax, lut, N, K);
  TORCH_CHECK(buf.scalar_type() == at::kFloat && buf.is_contiguous() && buf.numel() >= N * K, "buf of N*K f32");
  auto out = buf.view({-1}).narrow(0, 0, N * K).view({N, K});
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* ap = absmax.data_ptr<float>();
  const float* lp = lut.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N * K / 16, 256, [&](int64_t begin, int64_t end) {
    const __m256 lut_lo = _mm256_loadu_ps(lp), lut_hi = _mm256_loadu_ps(lp + 8);
    const __m256i m15 = _mm256_set1_epi32(15);
    for (int64_t i = begin; i < end; ++i) {
      __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(cp + i * 8)));
      const __m256 s = _mm256_set1_ps(ap[i / 4]);
      _mm256_storeu_ps(op + i * 16, _mm256_mul_ps(lookup(_mm256_and_si256(v, m15), lut_lo, lut_hi), s));
      _mm256_storeu_ps(op + i * 16 + 8, _mm256_mul_ps(lookup(_mm256_srli_epi32(v, 4), lut_lo, lut_hi), s));
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(LIBRARY, m) {
  m.def("nf4_linear", &nf4_linear);
  m.def("nf4_dequant", &nf4_dequant);
}
"""


def available() -> bool:
    """Whether the kernel runs on this CPU (builds it on the first call)."""
    return cpp_library.ops("nf4") is not None


def why_not() -> str | None:
    return cpp_library.why_not("nf4")


def _eligible(m: torch.nn.Module) -> bool:
    st = getattr(getattr(m, "weight", None), "quant_state", None)
    return (st is not None and st.quant_type == "nf4" and st.blocksize == BLOCK and m.in_features % BLOCK == 0
            and m.weight.device.type == "cpu" and m.weight.dtype == torch.uint8)


def repack(codes: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' packing (two weights a byte, the first in the high nibble) -> the kernel's (per 16 weights,
    byte j = weight j | weight j + 8 << 4). codes [n * 8 * g] u8 -> the same size."""
    c = codes.reshape(-1)
    w = torch.stack([c >> 4, c & 15], 1).view(-1, 2, 8)  # [groups of 16, halves, 8]
    return (w[:, 0] | (w[:, 1] << 4)).contiguous().view(-1)


def absmax32(state) -> torch.Tensor:
    """Each block's scale in float32, as ``dequantize_4bit`` computes it (double quantization undone)."""
    if state.nested:
        import bitsandbytes.functional as bnbf

        a = bnbf.dequantize_blockwise(state.absmax, state.state2)
        a += state.offset
        return a.float().contiguous()
    return state.absmax.float().contiguous()


class Nf4Linear:
    """One or several NF4 linears that read the same input, as one [sum(out), in] weight."""

    @staticmethod
    def build(modules: list[torch.nn.Module]) -> Nf4Linear | None:
        """None unless every member is a CPU bitsandbytes NF4 linear the kernel can run and the kernel builds."""
        if not modules or not all(_eligible(m) for m in modules):
            return None
        if len({m.in_features for m in modules}) != 1 or not available():
            return None
        lut = modules[0].weight.quant_state.code.float().contiguous()
        if any(not torch.equal(m.weight.quant_state.code.float(), lut) for m in modules):
            return None
        return Nf4Linear(modules, lut)

    def __init__(self, modules: list[torch.nn.Module], lut: torch.Tensor) -> None:
        self.in_features = modules[0].in_features  # K
        self.out_features = sum(m.out_features for m in modules)  # N
        self.lut = lut  # [16] f32: the NF4 code book
        self.codes = torch.cat([repack(m.weight.data) for m in modules])  # [N * K / 2] u8, the kernel's layout
        self.absmax = torch.cat([absmax32(m.weight.quant_state) for m in modules])  # [N * K / 64] f32
        biases = [m.bias for m in modules]
        self.bias = None if all(b is None for b in biases) else torch.cat([  # [N] f32
            (b.detach().float() if b is not None else torch.zeros(m.out_features)) for m, b in zip(modules, biases)])
        self.nbytes = self.codes.nbytes + self.absmax.nbytes + (0 if self.bias is None else self.bias.nbytes)
        self._ops = cpp_library.ops("nf4")

    def release_dense(self) -> bool:
        """The members' bitsandbytes weights are no longer needed: the codes here replace them."""
        return True

    def dequantized(self) -> torch.Tensor:
        """The float32 weights [N, K] (a fresh tensor)."""
        buf = torch.empty(self.out_features * self.in_features)
        return self._ops.nf4_dequant(self.codes, self.absmax, self.lut, buf, self.out_features, self.in_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] float32 -> [..., N] float32"""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).contiguous()
        n, k = self.out_features, self.in_features
        if x2.shape[0] <= KERNEL_ROWS:
            y = self._ops.nf4_linear(x2, self.codes, self.absmax, self.lut, n)
            if self.bias is not None:
                y += self.bias
        else:
            w = self._ops.nf4_dequant(self.codes, self.absmax, self.lut, cpp_library.scratch(n * k), n, k)
            y = F.linear(x2, w, self.bias)
        return y.view(*lead, n)
