// AVX2 implementation of the CPU optimizer kernels (AVX2 + FMA + F16C).
//
// Compiled for that instruction set by `#pragma GCC target` (the build has one flag set for all
// files); cpu_kernels.cpp only calls it when the CPU reports the features at run time.

// GCC contracts a*b + c into an FMA by default in C++ wherever the target has FMA; the kernels must
// use an FMA exactly where ATen does (explicit fmadd / std::fma) and nowhere else, and compute the
// float64 scalars as Python does. This applies to everything below, the included headers as well.
#pragma GCC optimize("fp-contract=off")
#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cpu_kernels.hpp"
#include "cpu_kernels_scalar.hpp"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace tierrt::cpu {
namespace {

// SqrtKind::kRsqrt14 needs the AVX-512 estimate vrsqrt14ps (here in its 256-bit AVX512VL form). That
// rounding is torch's only where MKL runs its AVX-512 code, so this AVX2 path computes it only when
// forced onto an AVX-512 CPU (tests); it is a separate, not inlined, function for that reason.
__attribute__((target("avx512f,avx512vl,avx2,fma"), noinline)) __m256 sqrt_rsqrt14_vl(__m256 x) {
  const __mmask8 small = _mm256_cmp_ps_mask(x, _mm256_set1_ps(0x1p-64f), _CMP_LT_OQ);
  const __m256 xs = _mm256_mask_mul_ps(x, small, x, _mm256_set1_ps(0x1p32f));
  const __m256 y = _mm256_rsqrt14_ps(xs);
  const __m256 s = _mm256_mul_ps(xs, y);
  const __m256 h = _mm256_mul_ps(_mm256_set1_ps(0.5f), y);
  __m256 r = _mm256_fmadd_ps(_mm256_fnmadd_ps(s, s, xs), h, s);
  r = _mm256_mask_mul_ps(r, small, r, _mm256_set1_ps(0x1p-16f));
  const __mmask8 keep = _mm256_cmp_ps_mask(x, _mm256_setzero_ps(), _CMP_EQ_OQ) |
                        _mm256_cmp_ps_mask(x, _mm256_set1_ps(__builtin_inff()), _CMP_EQ_OQ);
  return _mm256_mask_mov_ps(r, keep, x);
}

struct V {
  using reg = __m256;
  static constexpr int W = 8;
  static inline reg set1(float x) { return _mm256_set1_ps(x); }
  static inline reg load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, reg x) { _mm256_storeu_ps(p, x); }
  static inline reg load_bf16(const void* p) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
  }
  static inline reg load_f16(const void* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(p)));
  }
  // fp32 -> bf16, round to nearest even; NaN -> 0xFFFF (torch's encoding).
  static inline __m128i bf16_bits(reg x) {
    const __m256i b = _mm256_castps_si256(x);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), odd);
    r = _mm256_srli_epi32(r, 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    r = _mm256_or_si256(r, _mm256_and_si256(nan, _mm256_set1_epi32(0xFFFF)));  // r <= 0xFFFF
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  }
  static inline void store_bf16(void* p, reg x) {
    _mm_storeu_si128(static_cast<__m128i*>(p), bf16_bits(x));
  }
  static inline void store_f16(void* p, reg x) {
    const __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(static_cast<__m128i*>(p), h);
  }
  static inline void stream(float* p, reg x) { _mm256_stream_ps(p, x); }
  static inline void stream_bf16(void* p, reg x) { _mm_stream_si128(static_cast<__m128i*>(p), bf16_bits(x)); }
  static inline void stream_f16(void* p, reg x) {
    _mm_stream_si128(static_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static inline void fence() { _mm_sfence(); }
  static inline reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static inline reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static inline reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static inline reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
  static inline reg sqrt(reg a) { return _mm256_sqrt_ps(a); }
  static inline reg sqrt_rsqrt14(reg x) { return sqrt_rsqrt14_vl(x); }
  static inline reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static inline reg max_nan(reg a, reg b) {
    return _mm256_or_ps(_mm256_max_ps(a, b), _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
  }
  struct SumSq {
    __m256d acc[4];
    SumSq() {
      for (int q = 0; q < 4; ++q) acc[q] = _mm256_setzero_pd();
    }
    inline void add(const reg* x) {
      for (int h = 0; h < 2; ++h) {
        const __m256d a = _mm256_cvtps_pd(_mm256_castps256_ps128(x[h]));
        const __m256d b = _mm256_cvtps_pd(_mm256_extractf128_ps(x[h], 1));
        acc[2 * h] = _mm256_fmadd_pd(a, a, acc[2 * h]);  // a * a is exact in float64
        acc[2 * h + 1] = _mm256_fmadd_pd(b, b, acc[2 * h + 1]);
      }
    }
    inline void store(double* out) const {
      for (int q = 0; q < 4; ++q) _mm256_storeu_pd(out + 4 * q, acc[q]);
    }
  };
};

}  // namespace
}  // namespace tierrt::cpu

#include "cpu_kernels_loops.hpp"

namespace tierrt::cpu {

const KernelTable& avx2_kernels() {
  static const KernelTable table{Isa::kAvx2,    adam_vector,   sgd_vector, sumsq_block_vector,
                                 convert_vector, sqrt_vector, probe_vector};
  return table;
}

}  // namespace tierrt::cpu

#pragma GCC pop_options

#endif  // x86
