// AVX-512 implementation of the CPU optimizer kernels (AVX512F/BW/VL/DQ + FMA + F16C).
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
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

namespace tierrt::cpu {
namespace {

struct V {
  using reg = __m512;
  static constexpr int W = 16;
  static inline reg set1(float x) { return _mm512_set1_ps(x); }
  static inline reg load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, reg x) { _mm512_storeu_ps(p, x); }
  static inline reg load_bf16(const void* p) {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  }
  static inline reg load_f16(const void* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
  }
  // fp32 -> bf16, round to nearest even; NaN -> 0xFFFF (torch's encoding). AVX512_BF16's
  // vcvtneps2bf16 rounds the same way except that it flushes denormal inputs to zero and keeps NaN
  // payloads, so vectors holding either take the integer path. It is emitted with inline asm so that
  // this file needs no avx512bf16 target (CPUs with AVX-512 but without BF16 run the integer path).
  static inline __m256i bf16_bits(reg x) {
    if (g_has_bf16_instruction && _mm512_fpclass_ps_mask(x, 0xA1) == 0) {  // no NaN or denormal
      __m256i r;
      asm("vcvtneps2bf16 %1, %0" : "=v"(r) : "v"(x));
      return r;
    }
    const __m512i b = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), odd);
    r = _mm512_srli_epi32(r, 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0xFFFF));
    return _mm512_cvtepi32_epi16(r);
  }
  static inline void store_bf16(void* p, reg x) {
    _mm256_storeu_si256(static_cast<__m256i*>(p), bf16_bits(x));
  }
  static inline void store_f16(void* p, reg x) {
    const __m256i h = _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(static_cast<__m256i*>(p), h);
  }
  static inline void stream(float* p, reg x) { _mm512_stream_ps(p, x); }
  static inline void stream_bf16(void* p, reg x) {
    _mm256_stream_si256(static_cast<__m256i*>(p), bf16_bits(x));
  }
  static inline void stream_f16(void* p, reg x) {
    _mm256_stream_si256(static_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static inline void fence() { _mm_sfence(); }
  static inline reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static inline reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static inline reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static inline reg div(reg a, reg b) { return _mm512_div_ps(a, b); }
  static inline reg sqrt(reg a) { return _mm512_sqrt_ps(a); }
  // SqrtKind::kRsqrt14 (see cpu_kernels.hpp): an estimate refined once, small inputs scaled.
  static inline reg sqrt_rsqrt14(reg x) {
    const __mmask16 small = _mm512_cmp_ps_mask(x, _mm512_set1_ps(0x1p-64f), _CMP_LT_OQ);
    const reg xs = _mm512_mask_mul_ps(x, small, x, _mm512_set1_ps(0x1p32f));
    const reg y = _mm512_rsqrt14_ps(xs);
    const reg s = _mm512_mul_ps(xs, y);
    const reg h = _mm512_mul_ps(_mm512_set1_ps(0.5f), y);
    reg r = _mm512_fmadd_ps(_mm512_fnmadd_ps(s, s, xs), h, s);
    r = _mm512_mask_mul_ps(r, small, r, _mm512_set1_ps(0x1p-16f));
    const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_EQ_OQ) |
                           _mm512_cmp_ps_mask(x, _mm512_set1_ps(__builtin_inff()), _CMP_EQ_OQ);
    return _mm512_mask_mov_ps(r, keep, x);  // sqrt(+-0) = +-0, sqrt(inf) = inf
  }
  static inline reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static inline reg max_nan(reg a, reg b) {
    const __mmask16 nan = _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q);
    return _mm512_mask_mov_ps(_mm512_max_ps(a, b), nan, _mm512_castsi512_ps(_mm512_set1_epi32(-1)));
  }
  struct SumSq {
    __m512d lo, hi;
    SumSq() : lo(_mm512_setzero_pd()), hi(_mm512_setzero_pd()) {}
    inline void add(const reg* x) {
      const __m512d a = _mm512_cvtps_pd(_mm512_castps512_ps256(x[0]));
      const __m512d b = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x[0]), 1)));
      lo = _mm512_fmadd_pd(a, a, lo);  // a * a is exact in float64: same as lo + a * a
      hi = _mm512_fmadd_pd(b, b, hi);
    }
    inline void store(double* acc) const {
      _mm512_storeu_pd(acc, lo);
      _mm512_storeu_pd(acc + 8, hi);
    }
  };
};

}  // namespace
}  // namespace tierrt::cpu

#include "cpu_kernels_loops.hpp"

namespace tierrt::cpu {

const KernelTable& avx512_kernels() {
  static const KernelTable table{Isa::kAvx512,  adam_vector,   sgd_vector, sumsq_block_vector,
                                 convert_vector, sqrt_vector, probe_vector};
  return table;
}

}  // namespace tierrt::cpu

#pragma GCC pop_options

#endif  // x86
