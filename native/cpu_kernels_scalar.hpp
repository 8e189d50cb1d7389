// The reference arithmetic of the CPU optimizer kernels, one element at a time (portable C++).
//
// These functions define the numerics: the AVX2 and AVX-512 implementations run the same operations
// in the same order, lane by lane. Each line names the ATen operation of torch's single-tensor
// optimizer that it reproduces; an `fma` is where ATen's vectorized CPU kernel uses a fused
// multiply-add (add with alpha, lerp, addcmul), everything else is one correctly rounded fp32 op.
//
// NaN: NaN positions follow torch; NaN payloads are not specified (ATen's own vector and scalar
// paths and compilers' operand orders differ there), except in the fp16/bf16 outputs, which encode
// a NaN as torch does (see f32_to_bf16 / f32_to_f16).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_kernels.hpp"

namespace tierrt::cpu::scalar {

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; every NaN becomes 0xFFFF, as torch's `.to(torch.bfloat16)` writes it.
inline uint16_t f32_to_bf16(float f) {
  const uint32_t x = f32_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return 0xFFFF;
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

// Exact; a NaN keeps its payload and becomes quiet (as the F16C instruction vcvtph2ps does).
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  if (exp == 0x1F) return bits_f32(sign | 0x7F800000u | (mant << 13) | (mant ? 0x400000u : 0u));
  if (exp == 0) {
    const float mag = static_cast<float>(mant) * 0x1p-24f;  // exact: subnormal or zero
    return sign ? -mag : mag;
  }
  return bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

// IEEE binary16, round to nearest even, overflow to infinity; a NaN keeps its sign and the top bits
// of its payload and becomes quiet, as torch's `.to(torch.float16)` (the F16C instruction) writes it.
inline uint16_t f32_to_f16(float f) {
  const uint32_t x = f32_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u | ((ax >> 13) & 0x3FFu));
  if (ax >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520: rounds to inf
  if (ax >= 0x38800000u) {  // normal binary16 (>= 2^-14)
    const uint32_t rounded = ax + 0xFFFu + ((ax >> 13) & 1u);
    return static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13));
  }
  const int exp = static_cast<int>(ax >> 23);
  if (exp < 102) return static_cast<uint16_t>(sign);  // below 2^-25: rounds to zero
  const uint32_t mant = (ax & 0x7FFFFFu) | 0x800000u;
  const int shift = 126 - exp;  // 14..24
  uint32_t q = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return static_cast<uint16_t>(sign | q);
}

inline float load_grad(const void* grad, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kBFloat16:
      return bf16_to_f32(static_cast<const uint16_t*>(grad)[i]);
    case DType::kFloat16:
      return f16_to_f32(static_cast<const uint16_t*>(grad)[i]);
    default:
      return static_cast<const float*>(grad)[i];
  }
}

inline void store_out(void* out, DType dtype, int64_t i, float value) {
  switch (dtype) {
    case DType::kBFloat16:
      static_cast<uint16_t*>(out)[i] = f32_to_bf16(value);
      break;
    case DType::kFloat16:
      static_cast<uint16_t*>(out)[i] = f32_to_f16(value);
      break;
    default:
      static_cast<float*>(out)[i] = value;
  }
}

// torch.maximum: NaN if either is NaN (all-ones bits, as ATen's vector kernel writes it), otherwise
// the larger, the second operand when they compare equal (x86 maxps).
inline float max_nan(float a, float b) {
  if (a != a || b != b) return bits_f32(0xFFFFFFFFu);
  return a > b ? a : b;
}

// torch's rounding of sqrt with MKL on AVX-512 (see SqrtKind); defined in cpu_kernels_scalar.cpp,
// x86 only, and only called where the CPU has AVX-512F.
float sqrt_rsqrt14(float x);

inline float sqrt_of_kind(float x, SqrtKind kind) {
  return kind == SqrtKind::kRsqrt14 ? sqrt_rsqrt14(x) : std::sqrt(x);
}

// One element of torch's _single_tensor_adam (decoupled_weight_decay selects AdamW).
// With s.sqrt == kMoments only m, v and *vmax are updated (the caller keeps p); with kGiven, v is
// the square root torch computed and only p is updated (see SqrtKind).
inline void adam_element(float& p, float g, float& m, float& v, float* vmax, const AdamScalars& s) {
  if (s.sqrt == SqrtKind::kGiven) {
    if (s.wd_mode == WeightDecay::kDecoupled) p = p * s.wd;
    p = p + (s.neg_step_size * m) / (v / s.bc2_sqrt + s.eps);
    return;
  }
  if (s.has_grad_mul) g = g * s.grad_mul;  // grad.mul_(grad_scale); maximize: -grad
  if (s.wd_mode == WeightDecay::kDecoupled) {
    p = p * s.wd;  // param.mul_(1 - lr * weight_decay)
  } else if (s.wd_mode == WeightDecay::kL2) {
    g = std::fma(p, s.wd, g);  // grad = grad.add(param, alpha=weight_decay)
  }
  const float diff = g - m;  // exp_avg.lerp_(grad, 1 - beta1)
  m = std::fma(s.lerp_coeff, diff, s.lerp_small ? m : g);
  v = std::fma(s.one_minus_beta2 * g, g, v * s.beta2);  // exp_avg_sq.mul_(b2).addcmul_(g, g, 1-b2)
  float vv = v;
  if (vmax != nullptr) {  // torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
    *vmax = max_nan(*vmax, v);
    vv = *vmax;
  }
  if (s.sqrt == SqrtKind::kMoments) return;
  const float denom = sqrt_of_kind(vv, s.sqrt) / s.bc2_sqrt + s.eps;  // (v.sqrt() / bc2s).add_(eps)
  p = p + (s.neg_step_size * m) / denom;                  // param.addcdiv_(m, denom, -step_size)
}

// One element of torch's _single_tensor_sgd.
inline void sgd_element(float& p, float g, float* buf, const SgdScalars& s) {
  if (s.has_grad_mul) g = g * s.grad_mul;
  if (s.has_wd) g = std::fma(p, s.wd, g);  // grad = grad.add(param, alpha=weight_decay)
  if (s.has_momentum) {
    if (s.first_step) {
      *buf = g;  // buf = clone(grad)
    } else {
      *buf = std::fma(g, s.one_minus_dampening, *buf * s.momentum);  // buf.mul_(m).add_(g, 1-d)
    }
    g = s.nesterov ? std::fma(*buf, s.momentum, g) : *buf;  // grad.add(buf, alpha=momentum)
  }
  p = std::fma(g, s.neg_lr, p);  // param.add_(grad, alpha=-lr)
}

// The fixed combination of the 16 lanes of a grad_sumsq block (see kStatsBlock).
inline double combine16(const double* acc) {
  double a[16];
  for (int j = 0; j < 16; ++j) a[j] = acc[j];
  for (int width = 8; width >= 1; width /= 2) {
    for (int j = 0; j < width; ++j) a[j] = a[j] + a[j + width];
  }
  return a[0];
}

}  // namespace tierrt::cpu::scalar
