// The vector loops of the CPU optimizer kernels, written once over a vector-traits struct `V`.
//
// This file is included by cpu_kernels_avx512.cpp and cpu_kernels_avx2.cpp inside their
// `#pragma GCC target(...)` region, after each has defined its own `V` (register type, width W and
// the operations below) in namespace tierrt::cpu::{anonymous}; everything here has internal linkage,
// so each ISA gets its own copy compiled for its instruction set. Lane by lane, the operations are
// those of cpu_kernels_scalar.hpp (the reference), in the same order.
//
//   V::reg                     a vector of W floats
//   V::load(const float*) / V::store(float*, reg)           unaligned
//   V::load_bf16(const void*) / V::load_f16(const void*)     W 16-bit values -> fp32 (exact)
//   V::store_bf16(void*, reg) / V::store_f16(void*, reg)     fp32 -> W 16-bit values (RNE, torch's NaNs)
//   V::add, sub, mul, div, sqrt, fmadd(a, b, c) = a*b + c rounded once, max_nan (torch.maximum)
//   V::sqrt_rsqrt14            the square root with SqrtKind::kRsqrt14 rounding
//   V::stream(float*, reg), V::stream_bf16(void*, reg), V::stream_f16(void*, reg)
//                              the same stores, non-temporal; the address aligned to the store's size
//   V::fence()                 orders the non-temporal stores before what follows (sfence)
//   V::SumSq                   16 float64 accumulators: add(const reg x[16 / W]) does acc[j] += x[j]^2
//                              for the 16 floats of x; store(double[16]) writes them in lane order
//
// Each step is one streaming pass: every input is loaded once, every output stored once; the last
// partial vector of a range goes through small zero-padded staging buffers, so the tail uses the
// same vector code as the body.

namespace tierrt::cpu {
namespace {

enum OutKind : int { kOutNone = 0, kOutF32 = 1, kOutBF16 = 2, kOutF16 = 3 };

constexpr size_t out_size(int out) { return out == kOutF32 ? 4 : (out == kOutNone ? 0 : 2); }

// Software prefetch distance in bytes of fp32 data (0: rely on the hardware prefetchers).
inline int64_t prefetch_bytes() { return g_prefetch_bytes.load(std::memory_order_relaxed); }

template <DType G>
inline typename V::reg load_grad_vec(const void* ptr) {
  if constexpr (G == DType::kBFloat16) {
    return V::load_bf16(ptr);
  } else if constexpr (G == DType::kFloat16) {
    return V::load_f16(ptr);
  } else {
    return V::load(static_cast<const float*>(ptr));
  }
}

template <int OUT>
inline void store_out_vec(void* ptr, typename V::reg x) {
  if constexpr (OUT == kOutF32) {
    V::store(static_cast<float*>(ptr), x);
  } else if constexpr (OUT == kOutBF16) {
    V::store_bf16(ptr, x);
  } else if constexpr (OUT == kOutF16) {
    V::store_f16(ptr, x);
  }
}

template <int OUT>
inline void stream_out_vec(void* ptr, typename V::reg x) {
  if constexpr (OUT == kOutF32) {
    V::stream(static_cast<float*>(ptr), x);
  } else if constexpr (OUT == kOutBF16) {
    V::stream_bf16(ptr, x);
  } else if constexpr (OUT == kOutF16) {
    V::stream_f16(ptr, x);
  }
}

// Elements to process before out + i * os is aligned for a non-temporal vector store (W * os bytes).
template <int OUT>
inline int64_t stream_peel(const void* out, int64_t i) {
  constexpr int64_t bytes = V::W * static_cast<int64_t>(out_size(OUT));
  const auto address = reinterpret_cast<uintptr_t>(out) + static_cast<uintptr_t>(i) * out_size(OUT);
  return static_cast<int64_t>((bytes - static_cast<int64_t>(address % bytes)) % bytes) /
         static_cast<int64_t>(out_size(OUT));
}

template <SqrtKind SQ>
inline typename V::reg sqrt_vec(typename V::reg x) {
  if constexpr (SQ == SqrtKind::kRsqrt14) {
    return V::sqrt_rsqrt14(x);
  } else {
    return V::sqrt(x);
  }
}

struct AdamVec {
  typename V::reg grad_mul, wd, coeff, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step_size;
  bool has_grad_mul, lerp_small;
  explicit AdamVec(const AdamScalars& s)
      : grad_mul(V::set1(s.grad_mul)),
        wd(V::set1(s.wd)),
        coeff(V::set1(s.lerp_coeff)),
        beta2(V::set1(s.beta2)),
        one_minus_beta2(V::set1(s.one_minus_beta2)),
        bc2_sqrt(V::set1(s.bc2_sqrt)),
        eps(V::set1(s.eps)),
        neg_step_size(V::set1(s.neg_step_size)),
        has_grad_mul(s.has_grad_mul),
        lerp_small(s.lerp_small) {}
};

// One vector of the Adam step (see scalar::adam_element for the operation each line reproduces).
// Reads the weights at p_in, stores the updated ones to p_ptr (the same address for an in-place step)
// and returns them for the optional output.
template <DType G, WeightDecay WD, SqrtKind SQ>
inline typename V::reg adam_vec(const float* p_in, float* p_ptr, const void* g_ptr, float* m_ptr,
                                float* v_ptr, float* vmax_ptr, const AdamVec& c) {
  using reg = typename V::reg;
  if constexpr (SQ == SqrtKind::kGiven) {  // the second half: v_ptr holds torch's square roots
    reg p = V::load(p_in);
    if constexpr (WD == WeightDecay::kDecoupled) p = V::mul(p, c.wd);
    const reg denom = V::add(V::div(V::load(v_ptr), c.bc2_sqrt), c.eps);
    p = V::add(p, V::div(V::mul(c.neg_step_size, V::load(m_ptr)), denom));
    V::store(p_ptr, p);
    return p;
  }
  reg g = load_grad_vec<G>(g_ptr);
  if (c.has_grad_mul) g = V::mul(g, c.grad_mul);
  reg p = V::load(p_in);
  if constexpr (WD == WeightDecay::kDecoupled) {
    p = V::mul(p, c.wd);
  } else if constexpr (WD == WeightDecay::kL2) {
    g = V::fmadd(p, c.wd, g);
  }
  reg m = V::load(m_ptr);
  const reg diff = V::sub(g, m);
  m = V::fmadd(c.coeff, diff, c.lerp_small ? m : g);
  reg v = V::load(v_ptr);
  v = V::fmadd(V::mul(c.one_minus_beta2, g), g, V::mul(v, c.beta2));
  V::store(m_ptr, m);
  V::store(v_ptr, v);
  if (vmax_ptr != nullptr) {
    v = V::max_nan(V::load(vmax_ptr), v);
    V::store(vmax_ptr, v);
  }
  if constexpr (SQ == SqrtKind::kMoments) return p;  // the weights are written by the second half
  const reg denom = V::add(V::div(sqrt_vec<SQ>(v), c.bc2_sqrt), c.eps);
  p = V::add(p, V::div(V::mul(c.neg_step_size, m), denom));
  V::store(p_ptr, p);
  return p;
}

inline void prefetch(const void* ptr) { __builtin_prefetch(ptr, 0, 3); }

// Whether [begin, end) stores its weight output with non-temporal stores (see AdamArrays::stream_out).
inline bool use_stream(bool stream_out, int64_t begin, int64_t end) {
  return stream_out && end - begin >= 64 * V::W;
}

// Elements [i, i + k), k < W, through zero-padded staging buffers and the same vector code.
template <DType G, int OUT, WeightDecay WD, SqrtKind SQ>
void adam_partial(const AdamArrays& a, const AdamVec& c, int64_t i, int64_t k) {
  constexpr int W = V::W;
  constexpr size_t gs = G == DType::kFloat32 ? 4 : 2;
  constexpr size_t os = out_size(OUT);
  const bool ams = a.max_exp_avg_sq != nullptr;
  const size_t bytes = static_cast<size_t>(k) * 4;
  alignas(64) float p[W] = {}, m[W] = {}, v[W] = {}, mx[W] = {};
  alignas(64) unsigned char gb[W * 4] = {}, ob[W * 4] = {};
  std::memcpy(p, (a.param_in != nullptr ? a.param_in : a.param) + i, bytes);
  std::memcpy(m, a.exp_avg + i, bytes);
  std::memcpy(v, a.exp_avg_sq + i, bytes);
  std::memcpy(gb, static_cast<const char*>(a.grad) + i * gs, static_cast<size_t>(k) * gs);
  if (ams) std::memcpy(mx, a.max_exp_avg_sq + i, bytes);
  const typename V::reg pv = adam_vec<G, WD, SQ>(p, p, gb, m, v, ams ? mx : nullptr, c);
  if constexpr (SQ == SqrtKind::kMoments) {
    std::memcpy(a.exp_avg + i, m, bytes);
    std::memcpy(a.exp_avg_sq + i, v, bytes);
    if (ams) std::memcpy(a.max_exp_avg_sq + i, mx, bytes);
    return;
  }
  std::memcpy(a.param + i, p, bytes);
  std::memcpy(a.exp_avg + i, m, bytes);
  std::memcpy(a.exp_avg_sq + i, v, bytes);
  if (ams) std::memcpy(a.max_exp_avg_sq + i, mx, bytes);
  if constexpr (OUT != kOutNone) {
    store_out_vec<OUT>(ob, pv);
    std::memcpy(static_cast<char*>(a.out) + i * os, ob, static_cast<size_t>(k) * os);
  }
}

template <DType G, int OUT, WeightDecay WD, SqrtKind SQ>
void adam_loop(const AdamArrays& a, const AdamScalars& s, int64_t begin, int64_t end) {
  constexpr int W = V::W;
  constexpr size_t gs = G == DType::kFloat32 ? 4 : 2;
  constexpr size_t os = out_size(OUT);
  const AdamVec c(s);
  const bool ams = a.max_exp_avg_sq != nullptr && SQ != SqrtKind::kGiven;
  const float* pin = a.param_in != nullptr ? a.param_in : a.param;
  const char* g = static_cast<const char*>(a.grad);
  char* o = static_cast<char*>(a.out);
  const int64_t pf = prefetch_bytes();
  int64_t i = begin;
  bool stream = false;
  if constexpr (OUT != kOutNone && SQ != SqrtKind::kMoments) {
    if (use_stream(a.stream_out, begin, end)) {
      stream = true;
      const int64_t peel = stream_peel<OUT>(o, i);
      if (peel > 0) adam_partial<G, OUT, WD, SQ>(a, c, i, peel);
      i += peel;
    }
  }
  for (; i + W <= end; i += W) {
    if (pf > 0) {
      const int64_t d = pf / 4;
      prefetch(pin + i + d);
      prefetch(a.exp_avg + i + d);
      prefetch(a.exp_avg_sq + i + d);
      prefetch(g + (i + d) * gs);
    }
    const typename V::reg p = adam_vec<G, WD, SQ>(pin + i, a.param + i, g + i * gs, a.exp_avg + i,
                                                  a.exp_avg_sq + i,
                                                  ams ? a.max_exp_avg_sq + i : nullptr, c);
    if constexpr (OUT != kOutNone && SQ != SqrtKind::kMoments) {
      if (stream) {
        stream_out_vec<OUT>(o + i * os, p);
      } else {
        store_out_vec<OUT>(o + i * os, p);
      }
    }
  }
  if (i < end) adam_partial<G, OUT, WD, SQ>(a, c, i, end - i);
  if (stream) V::fence();
}

template <DType G, int OUT, SqrtKind SQ>
void adam_dispatch_wd(const AdamArrays& a, const AdamScalars& s, int64_t begin, int64_t end) {
  switch (s.wd_mode) {
    case WeightDecay::kDecoupled:
      return adam_loop<G, OUT, WeightDecay::kDecoupled, SQ>(a, s, begin, end);
    case WeightDecay::kL2:
      return adam_loop<G, OUT, WeightDecay::kL2, SQ>(a, s, begin, end);
    default:
      return adam_loop<G, OUT, WeightDecay::kNone, SQ>(a, s, begin, end);
  }
}

template <DType G, int OUT>
void adam_dispatch_sqrt(const AdamArrays& a, const AdamScalars& s, int64_t begin, int64_t end) {
  switch (s.sqrt) {
    case SqrtKind::kRsqrt14:
      return adam_dispatch_wd<G, OUT, SqrtKind::kRsqrt14>(a, s, begin, end);
    case SqrtKind::kMoments:
      return adam_dispatch_wd<G, kOutNone, SqrtKind::kMoments>(a, s, begin, end);
    case SqrtKind::kGiven:
      return adam_dispatch_wd<G, OUT, SqrtKind::kGiven>(a, s, begin, end);
    default:
      return adam_dispatch_wd<G, OUT, SqrtKind::kIeee>(a, s, begin, end);
  }
}

template <DType G>
void adam_dispatch_out(const AdamArrays& a, const AdamScalars& s, int64_t begin, int64_t end) {
  if (a.out == nullptr) return adam_dispatch_sqrt<G, kOutNone>(a, s, begin, end);
  switch (a.out_dtype) {
    case DType::kBFloat16:
      return adam_dispatch_sqrt<G, kOutBF16>(a, s, begin, end);
    case DType::kFloat16:
      return adam_dispatch_sqrt<G, kOutF16>(a, s, begin, end);
    default:
      return adam_dispatch_sqrt<G, kOutF32>(a, s, begin, end);
  }
}

void adam_vector(const AdamArrays& a, const AdamScalars& s, int64_t begin, int64_t end) {
  switch (a.grad_dtype) {
    case DType::kBFloat16:
      return adam_dispatch_out<DType::kBFloat16>(a, s, begin, end);
    case DType::kFloat16:
      return adam_dispatch_out<DType::kFloat16>(a, s, begin, end);
    default:
      return adam_dispatch_out<DType::kFloat32>(a, s, begin, end);
  }
}

// ---- SGD ----

enum MomentumKind : int { kNoMomentum = 0, kFirstStep = 1, kMomentum = 2 };

struct SgdVec {
  typename V::reg grad_mul, wd, momentum, one_minus_dampening, neg_lr;
  bool has_grad_mul, has_wd, nesterov;
  explicit SgdVec(const SgdScalars& s)
      : grad_mul(V::set1(s.grad_mul)),
        wd(V::set1(s.wd)),
        momentum(V::set1(s.momentum)),
        one_minus_dampening(V::set1(s.one_minus_dampening)),
        neg_lr(V::set1(s.neg_lr)),
        has_grad_mul(s.has_grad_mul),
        has_wd(s.has_wd),
        nesterov(s.nesterov) {}
};

// One vector of the SGD step (see scalar::sgd_element).
template <DType G, int MOM>
inline typename V::reg sgd_vec(const float* p_in, float* p_ptr, const void* g_ptr, float* b_ptr,
                               const SgdVec& c) {
  using reg = typename V::reg;
  reg g = load_grad_vec<G>(g_ptr);
  if (c.has_grad_mul) g = V::mul(g, c.grad_mul);
  reg p = V::load(p_in);
  if (c.has_wd) g = V::fmadd(p, c.wd, g);
  if constexpr (MOM != kNoMomentum) {
    reg buf;
    if constexpr (MOM == kFirstStep) {
      buf = g;
    } else {
      buf = V::fmadd(g, c.one_minus_dampening, V::mul(V::load(b_ptr), c.momentum));
    }
    V::store(b_ptr, buf);
    g = c.nesterov ? V::fmadd(buf, c.momentum, g) : buf;
  }
  p = V::fmadd(g, c.neg_lr, p);
  V::store(p_ptr, p);
  return p;
}

template <DType G, int OUT, int MOM>
void sgd_partial(const SgdArrays& a, const SgdVec& c, int64_t i, int64_t k) {
  constexpr int W = V::W;
  constexpr size_t gs = G == DType::kFloat32 ? 4 : 2;
  constexpr size_t os = out_size(OUT);
  const size_t bytes = static_cast<size_t>(k) * 4;
  alignas(64) float p[W] = {}, b[W] = {};
  alignas(64) unsigned char gb[W * 4] = {}, ob[W * 4] = {};
  std::memcpy(p, (a.param_in != nullptr ? a.param_in : a.param) + i, bytes);
  std::memcpy(gb, static_cast<const char*>(a.grad) + i * gs, static_cast<size_t>(k) * gs);
  if constexpr (MOM == kMomentum) std::memcpy(b, a.momentum_buf + i, bytes);
  const typename V::reg pv = sgd_vec<G, MOM>(p, p, gb, b, c);
  std::memcpy(a.param + i, p, bytes);
  if constexpr (MOM != kNoMomentum) std::memcpy(a.momentum_buf + i, b, bytes);
  if constexpr (OUT != kOutNone) {
    store_out_vec<OUT>(ob, pv);
    std::memcpy(static_cast<char*>(a.out) + i * os, ob, static_cast<size_t>(k) * os);
  }
}

template <DType G, int OUT, int MOM>
void sgd_loop(const SgdArrays& a, const SgdScalars& s, int64_t begin, int64_t end) {
  constexpr int W = V::W;
  constexpr size_t gs = G == DType::kFloat32 ? 4 : 2;
  constexpr size_t os = out_size(OUT);
  const SgdVec c(s);
  const float* pin = a.param_in != nullptr ? a.param_in : a.param;
  const char* g = static_cast<const char*>(a.grad);
  char* o = static_cast<char*>(a.out);
  const int64_t pf = prefetch_bytes();
  int64_t i = begin;
  bool stream = false;
  if constexpr (OUT != kOutNone) {
    if (use_stream(a.stream_out, begin, end)) {
      stream = true;
      const int64_t peel = stream_peel<OUT>(o, i);
      if (peel > 0) sgd_partial<G, OUT, MOM>(a, c, i, peel);
      i += peel;
    }
  }
  for (; i + W <= end; i += W) {
    if (pf > 0) {
      const int64_t d = pf / 4;
      prefetch(pin + i + d);
      prefetch(g + (i + d) * gs);
      if constexpr (MOM == kMomentum) prefetch(a.momentum_buf + i + d);
    }
    const typename V::reg p =
        sgd_vec<G, MOM>(pin + i, a.param + i, g + i * gs,
                        MOM != kNoMomentum ? a.momentum_buf + i : nullptr, c);
    if constexpr (OUT != kOutNone) {
      if (stream) {
        stream_out_vec<OUT>(o + i * os, p);
      } else {
        store_out_vec<OUT>(o + i * os, p);
      }
    }
  }
  if (i < end) sgd_partial<G, OUT, MOM>(a, c, i, end - i);
  if (stream) V::fence();
}

template <DType G, int OUT>
void sgd_dispatch_mom(const SgdArrays& a, const SgdScalars& s, int64_t begin, int64_t end) {
  if (!s.has_momentum) return sgd_loop<G, OUT, kNoMomentum>(a, s, begin, end);
  if (s.first_step) return sgd_loop<G, OUT, kFirstStep>(a, s, begin, end);
  return sgd_loop<G, OUT, kMomentum>(a, s, begin, end);
}

template <DType G>
void sgd_dispatch_out(const SgdArrays& a, const SgdScalars& s, int64_t begin, int64_t end) {
  if (a.out == nullptr) return sgd_dispatch_mom<G, kOutNone>(a, s, begin, end);
  switch (a.out_dtype) {
    case DType::kBFloat16:
      return sgd_dispatch_mom<G, kOutBF16>(a, s, begin, end);
    case DType::kFloat16:
      return sgd_dispatch_mom<G, kOutF16>(a, s, begin, end);
    default:
      return sgd_dispatch_mom<G, kOutF32>(a, s, begin, end);
  }
}

void sgd_vector(const SgdArrays& a, const SgdScalars& s, int64_t begin, int64_t end) {
  switch (a.grad_dtype) {
    case DType::kBFloat16:
      return sgd_dispatch_out<DType::kBFloat16>(a, s, begin, end);
    case DType::kFloat16:
      return sgd_dispatch_out<DType::kFloat16>(a, s, begin, end);
    default:
      return sgd_dispatch_out<DType::kFloat32>(a, s, begin, end);
  }
}

// ---- gradient statistics ----

template <DType G>
double sumsq_block_impl(const void* grad, int64_t n, int64_t block) {
  constexpr size_t gs = G == DType::kFloat32 ? 4 : 2;
  const int64_t begin = block * kStatsBlock;
  const int64_t end = n < begin + kStatsBlock ? n : begin + kStatsBlock;
  const char* g = static_cast<const char*>(grad);
  typename V::SumSq sums;
  int64_t i = begin;
  const int64_t pf = prefetch_bytes() / 4;
  for (; i + 16 <= end; i += 16) {
    if (pf > 0) prefetch(g + (i + pf) * gs);
    typename V::reg x[16 / V::W];
    for (int h = 0; h < 16 / V::W; ++h) x[h] = load_grad_vec<G>(g + (i + h * V::W) * gs);
    sums.add(x);
  }
  alignas(64) double acc[16];
  sums.store(acc);
  for (; i < end; ++i) {
    const double value = scalar::load_grad(grad, G, i);
    acc[(i - begin) & 15] += value * value;
  }
  return scalar::combine16(acc);
}

double sumsq_block_vector(const void* grad, DType dtype, int64_t n, int64_t block) {
  switch (dtype) {
    case DType::kBFloat16:
      return sumsq_block_impl<DType::kBFloat16>(grad, n, block);
    case DType::kFloat16:
      return sumsq_block_impl<DType::kFloat16>(grad, n, block);
    default:
      return sumsq_block_impl<DType::kFloat32>(grad, n, block);
  }
}

// ---- conversion (the fused output's rounding, on its own) ----

template <int OUT>
void convert_loop(const float* src, void* dst, int64_t begin, int64_t end) {
  constexpr int W = V::W;
  constexpr size_t os = out_size(OUT);
  char* o = static_cast<char*>(dst);
  int64_t i = begin;
  for (; i + W <= end; i += W) store_out_vec<OUT>(o + i * os, V::load(src + i));
  if (i < end) {
    const size_t k = static_cast<size_t>(end - i);
    alignas(64) float x[W] = {};
    alignas(64) unsigned char ob[W * 4] = {};
    std::memcpy(x, src + i, k * 4);
    store_out_vec<OUT>(ob, V::load(x));
    std::memcpy(o + i * os, ob, k * os);
  }
}

void convert_vector(const float* src, void* dst, DType dtype, int64_t begin, int64_t end) {
  switch (dtype) {
    case DType::kBFloat16:
      return convert_loop<kOutBF16>(src, dst, begin, end);
    case DType::kFloat16:
      return convert_loop<kOutF16>(src, dst, begin, end);
    default:
      return convert_loop<kOutF32>(src, dst, begin, end);
  }
}

// ---- square roots (detection of torch's rounding, tests) ----

template <SqrtKind SQ>
void sqrt_loop(const float* src, float* dst, int64_t begin, int64_t end) {
  constexpr int W = V::W;
  int64_t i = begin;
  for (; i + W <= end; i += W) V::store(dst + i, sqrt_vec<SQ>(V::load(src + i)));
  if (i < end) {
    const size_t k = static_cast<size_t>(end - i);
    alignas(64) float x[W] = {};
    std::memcpy(x, src + i, k * 4);
    V::store(x, sqrt_vec<SQ>(V::load(x)));
    std::memcpy(dst + i, x, k * 4);
  }
}

void sqrt_vector(const float* src, float* dst, SqrtKind kind, int64_t begin, int64_t end) {
  if (kind == SqrtKind::kRsqrt14) return sqrt_loop<SqrtKind::kRsqrt14>(src, dst, begin, end);
  return sqrt_loop<SqrtKind::kIeee>(src, dst, begin, end);
}

// ---- memory probe: a step's streams without its arithmetic ----

void probe_vector(float* p, const float* g, float* m, float* v, int64_t begin, int64_t end) {
  constexpr int W = V::W;
  const int64_t pf = prefetch_bytes() / 4;
  int64_t i = begin;
  for (; i + W <= end; i += W) {
    if (pf > 0) {
      prefetch(p + i + pf);
      prefetch(g + i + pf);
      prefetch(m + i + pf);
      prefetch(v + i + pf);
    }
    const typename V::reg x = V::load(g + i);
    V::store(p + i, V::add(V::load(p + i), x));
    V::store(m + i, V::add(V::load(m + i), x));
    V::store(v + i, V::add(V::load(v + i), x));
  }
  for (; i < end; ++i) {
    p[i] += g[i];
    m[i] += g[i];
    v[i] += g[i];
  }
}

}  // namespace
}  // namespace tierrt::cpu
