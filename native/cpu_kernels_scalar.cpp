// Portable scalar implementation of the CPU optimizer kernels (any CPU; the reference for tests).

// GCC contracts a*b + c into an FMA by default in C++ wherever the target has FMA; the kernels must
// use an FMA exactly where ATen does (explicit fmadd / std::fma) and nowhere else, and compute the
// float64 scalars as Python does. This applies to everything below, the included headers as well.
#pragma GCC optimize("fp-contract=off")
#include <algorithm>
#include <cmath>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "cpu_kernels.hpp"
#include "cpu_kernels_scalar.hpp"

namespace tierrt::cpu {

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx512f,fma"))) float scalar::sqrt_rsqrt14(float x) {
  if (x == 0.0f || x == INFINITY) return x;
  const bool small = x < 0x1p-64f;  // scaled so that the residual below stays a normal number
  const float xs = small ? x * 0x1p32f : x;
  const float y = _mm_cvtss_f32(_mm_rsqrt14_ss(_mm_setzero_ps(), _mm_set_ss(xs)));
  const float s = xs * y;
  const float h = 0.5f * y;
  const float r = std::fma(std::fma(-s, s, xs), h, s);
  return small ? r * 0x1p-16f : r;
}
#else
float scalar::sqrt_rsqrt14(float x) { return std::sqrt(x); }  // never selected off x86
#endif

namespace {

void adam_scalar(const AdamArrays& a, const AdamScalars& s, int64_t begin, int64_t end) {
  const float* pin = a.param_in != nullptr ? a.param_in : a.param;
  for (int64_t i = begin; i < end; ++i) {
    float* vmax = a.max_exp_avg_sq != nullptr ? a.max_exp_avg_sq + i : nullptr;
    float p = pin[i];
    scalar::adam_element(p, scalar::load_grad(a.grad, a.grad_dtype, i), a.exp_avg[i],
                         a.exp_avg_sq[i], vmax, s);
    if (s.sqrt == SqrtKind::kMoments) continue;  // the weights are written by the second half
    a.param[i] = p;
    if (a.out != nullptr) scalar::store_out(a.out, a.out_dtype, i, p);
  }
}

void sgd_scalar(const SgdArrays& a, const SgdScalars& s, int64_t begin, int64_t end) {
  const float* pin = a.param_in != nullptr ? a.param_in : a.param;
  for (int64_t i = begin; i < end; ++i) {
    float* buf = a.momentum_buf != nullptr ? a.momentum_buf + i : nullptr;
    float p = pin[i];
    scalar::sgd_element(p, scalar::load_grad(a.grad, a.grad_dtype, i), buf, s);
    a.param[i] = p;
    if (a.out != nullptr) scalar::store_out(a.out, a.out_dtype, i, p);
  }
}

double sumsq_block_scalar(const void* grad, DType dtype, int64_t n, int64_t block) {
  const int64_t begin = block * kStatsBlock;
  const int64_t end = std::min(n, begin + kStatsBlock);
  double acc[16] = {};
  for (int64_t i = begin; i < end; ++i) {
    const double x = scalar::load_grad(grad, dtype, i);
    acc[(i - begin) & 15] += x * x;  // x * x is exact in float64
  }
  return scalar::combine16(acc);
}

void convert_scalar(const float* src, void* dst, DType dtype, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) scalar::store_out(dst, dtype, i, src[i]);
}

void sqrt_scalar(const float* src, float* dst, SqrtKind kind, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) dst[i] = scalar::sqrt_of_kind(src[i], kind);
}

void probe_scalar(float* p, const float* g, float* m, float* v, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    p[i] += g[i];
    m[i] += g[i];
    v[i] += g[i];
  }
}

}  // namespace

const KernelTable& scalar_kernels() {
  static const KernelTable table{Isa::kScalar, adam_scalar,    sgd_scalar, sumsq_block_scalar,
                                 convert_scalar, sqrt_scalar, probe_scalar};
  return table;
}

}  // namespace tierrt::cpu
