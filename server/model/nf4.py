"""Linears over NF4 weights computed by our own CPU kernel, from the 4-bit codes themselves, in float32.

bitsandbytes' CPU 4-bit matmul is fast only with AVX-512; without it (AMD EPYC, AVX2) the served default held
the NF4 values dequantized in float32 (4 bytes a weight), and one decode step read 0.5 GB of weights. This kernel
reads the codes (half a byte a weight, plus a float32 scale per 64) and turns each into its value in registers:
a 16-entry table lookup (two AVX2 permutes and a blend) times the block's absmax, then FMAs in float32. The values
are the ones bitsandbytes' ``dequantize_4bit`` gives in float32 (the same table, the same absmax: checked bit for
bit in the tests), so a QLoRA adapter sees the base it was trained against; only the order of the float32 sums
differs from a dense matmul.

- up to ``KERNEL_ROWS`` tokens (decodes, a small batch): the kernel, the tokens in tiles of 4 that share each
  weight row's decoding. Measured on the 2-core AMD EPYC (AVX2), 2026-12-02, the 120 base linears of SmolLM2-135M
  with the weights out of cache: 1 token 12.9 ms against 53 ms dense float32; 4 tokens 16 ms against 88 ms;
  16 tokens 69 against 90; 32 tokens 134 against 115 (so larger batches take the next path).
- more tokens (prefill chunks, full batches): the layer's weights are decoded into a reused float32 scratch
  buffer and one dense matmul runs (the decoding costs ~0.5 ms a layer, against seconds of prefill).

Built with the other kernels (cpp_library.py; needs AVX2 and FMA; elsewhere bitsandbytes' own path serves). The codes are repacked
at load so that a group of 16 weights is 8 bytes, byte j holding weight j (low nibble) and weight j + 8 (high).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpp_library

KERNEL_ROWS = 24  # at most this many tokens run the kernel; more: dequantize into scratch + one matmul
BLOCK = 64  # weights per absmax (bitsandbytes' default blocksize, what the loader quantizes with)

SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <immintrin.h>

// value of each code: the table's entry (two permutes of 8 and a blend on the index's bit 3)
static inline __m256 lookup(__m256i idx, __m256 lo, __m256 hi) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// R tokens (rows of x, K apart) against one weight row: its codes (K / 2 bytes) and absmax (K / 64)
template <int R>
static inline void rows(const float* x, int64_t K, const uint8_t* codes, const float* am, __m256 lut_lo,
                        __m256 lut_hi, float* out, int64_t N) {
  const __m256i m15 = _mm256_set1_epi32(15);
  __m256 acc[R], b0[R], b1[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t blk = 0; blk < K / 64; ++blk) {
    for (int r = 0; r < R; ++r) { b0[r] = _mm256_setzero_ps(); b1[r] = _mm256_setzero_ps(); }
    for (int g = 0; g < 4; ++g) {
      const int64_t j = blk * 64 + g * 16;
      __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + j / 2)));
      __m256 w0 = lookup(_mm256_and_si256(v, m15), lut_lo, lut_hi);
      __m256 w1 = lookup(_mm256_srli_epi32(v, 4), lut_lo, lut_hi);
      for (int r = 0; r < R; ++r) {
        b0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * K + j), b0[r]);
        b1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * K + j + 8), b1[r]);
      }
    }
    const __m256 s = _mm256_set1_ps(am[blk]);
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_add_ps(b0[r], b1[r]), s, acc[r]);
  }
  for (int r = 0; r < R; ++r) out[r * N] = hsum(acc[r]);
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
  const float* xp = x.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* ap = absmax.data_ptr<float>();
  const float* lp = lut.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 8, [&](int64_t begin, int64_t end) {
    const __m256 lut_lo = _mm256_loadu_ps(lp), lut_hi = _mm256_loadu_ps(lp + 8);
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* c = cp + n * K / 2;
      const float* a = ap + n * K / 64;
      int64_t t = 0;
      for (; t + 4 <= T; t += 4) rows<4>(xp + t * K, K, c, a, lut_lo, lut_hi, op + t * N + n, N);
      switch (T - t) {
        case 3: rows<3>(xp + t * K, K, c, a, lut_lo, lut_hi, op + t * N + n, N); break;
        case 2: rows<2>(xp + t * K, K, c, a, lut_lo, lut_hi, op + t * N + n, N); break;
        case 1: rows<1>(xp + t * K, K, c, a, lut_lo, lut_hi, op + t * N + n, N); break;
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
