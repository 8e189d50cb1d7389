// CPU optimizer kernels: AdamW / Adam / SGD steps over fp32 master weights and fp32 optimizer
// state, and a one-pass gradient check (sum of squares, inf/nan), each in one streaming pass.
//
// Numerics: every kernel computes, element by element, exactly the fp32 operations that PyTorch's
// single-tensor CPU optimizers (torch.optim.AdamW / Adam / SGD with foreach=None, fused=None) run
// as a sequence of ATen elementwise ops, in the same order and with the same fused multiply-adds,
// so the results are bitwise equal to torch's (see the formulas in cpu_kernels_scalar.hpp). The
// scalars are derived in float64 exactly as torch's Python code derives them and rounded to fp32
// where ATen rounds them. The FMAs are those of ATen's AVX2 / AVX-512 kernels (lerp, addcmul, add
// with alpha); nothing else is contracted (these files turn GCC's default contraction off). The one
// operation whose rounding depends on how torch was built is sqrt: see SqrtKind.
//
// Performance: a step is memory-bound. Each element is loaded once and stored once (param or
// param_in, grad, exp_avg, exp_avg_sq in; param, exp_avg, exp_avg_sq and the optional weight output
// out), with
// software prefetch ahead of the streams and, for large steps, non-temporal stores for the output
// (which the step never reads). Threads (cpu_threads.hpp) take contiguous parts of the range.
//
// Three implementations of the same arithmetic: AVX-512 (cpu_kernels_avx512.cpp), AVX2+FMA+F16C
// (cpu_kernels_avx2.cpp) and portable scalar (cpu_kernels_scalar.hpp). The ISA-specific files are
// compiled with `#pragma GCC target`, so one build runs on any x86-64 and the best available
// implementation is chosen at run time (cpu_kernels.cpp).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

namespace tierrt::cpu {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
enum class WeightDecay : int { kNone = 0, kDecoupled = 1, kL2 = 2 };

// How torch's fp32 `Tensor.sqrt()` rounds, which differs between torch builds and CPUs:
//  kIeee     correctly rounded (vsqrtps): torch without MKL, or MKL's AVX2 code path.
//  kRsqrt14  torch with MKL on an AVX-512 CPU: ATen's sqrt calls MKL's vmsSqrt (VML_HA), whose AVX-512
//            code is an estimate refined once; it is off by one ulp (rounded down) for about 0.6% of
//            inputs. Reproduced exactly, for every fp32 input, by
//              y = rsqrt14(x); s = x*y; h = 0.5*y; r = fma(fma(-s, s, x), h, s)
//            with x scaled by 2^32 (and r by 2^-16) below 2^-64, and sqrt(+-0) = +-0, sqrt(inf) =
//            inf. (Found by testing against vmsSqrt on all 2^32 inputs; needs the AVX-512
//            instruction vrsqrt14ps, which every CPU on which MKL takes this path has.)
// The Python layer detects which one the running torch uses (tierrt.optim.kernels.torch_sqrt_kind).
// Where it is neither (MKL's code for other CPUs, e.g. AMD's), a step runs in two halves around
// torch's own sqrt, chunk by chunk (tierrt.optim.kernels.adam_step_):
//  kMoments  the first half: the gradient's scaling and L2 term, exp_avg, exp_avg_sq and the AMSGrad
//            maximum are updated; the weights and `out` are not written.
//  kGiven    the second half: `exp_avg_sq` holds torch's sqrt of exp_avg_sq (of the AMSGrad maximum
//            with amsgrad) instead; decoupled weight decay and the update are applied to the weights
//            (and `out`); exp_avg and the gradient are only read.
enum class SqrtKind : int { kIeee = 0, kRsqrt14 = 1, kMoments = 2, kGiven = 3 };

inline size_t dtype_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }
const char* dtype_name(DType d);
const char* isa_name(Isa isa);

// Scalars of one Adam/AdamW step, already rounded to fp32 the way ATen rounds them.
struct AdamScalars {
  bool has_grad_mul = false;  // multiply the gradient by grad_mul first (grad_scale, maximize)
  float grad_mul = 1.0f;      // fp32(grad_scale), negated for maximize
  WeightDecay wd_mode = WeightDecay::kNone;
  float wd = 0.0f;            // decoupled: fp32(1 - lr*wd) (param.mul_); L2: fp32(wd) (grad.add)
  bool lerp_small = true;     // |fp32(1 - beta1)| < 0.5: ATen's lerp takes its "small weight" branch
  float lerp_coeff = 0.1f;    // small: w; otherwise w - 1 (in fp32), w = fp32(1 - beta1)
  float beta2 = 0.999f;       // fp32(beta2)
  float one_minus_beta2 = 0.001f;  // fp32(1 - beta2)
  SqrtKind sqrt = SqrtKind::kIeee;  // the rounding of torch's exp_avg_sq.sqrt()
  float bc2_sqrt = 1.0f;      // fp32((1 - beta2**step) ** 0.5)
  float eps = 1e-8f;          // fp32(eps)
  float neg_step_size = 0.0f; // fp32(-(lr / (1 - beta1**step)))
};

struct AdamArrays {
  float* param = nullptr;
  // Out-of-place step: read the weights from here and write the result to param (which param_in is
  // never written through). Null: param is read and updated in place. Must equal param or not overlap it.
  const float* param_in = nullptr;
  const void* grad = nullptr;
  float* exp_avg = nullptr;
  float* exp_avg_sq = nullptr;
  float* max_exp_avg_sq = nullptr;  // amsgrad when non-null
  void* out = nullptr;              // optional copy of the updated weights in out_dtype
  DType grad_dtype = DType::kFloat32;
  DType out_dtype = DType::kBFloat16;
  // Store `out` with non-temporal stores: set by adam_step for large steps (kStreamOutBytes), where
  // it saves reading the output's cache lines before writing them (2 of 32 bytes per element with
  // bf16 output) and keeps the output, which the step never reads, from evicting the state.
  bool stream_out = false;
};

// Scalars of one SGD step (torch.optim.SGD, single-tensor path), rounded to fp32 like ATen.
struct SgdScalars {
  bool has_grad_mul = false;
  float grad_mul = 1.0f;
  bool has_wd = false;
  float wd = 0.0f;                  // grad.add(param, alpha=wd)
  bool has_momentum = false;
  bool first_step = false;          // buffer = clone(grad) instead of the momentum update
  bool nesterov = false;
  float momentum = 0.0f;            // buf.mul_(momentum); grad.add(buf, alpha=momentum)
  float one_minus_dampening = 1.0f; // buf.add_(grad, alpha=1 - dampening)
  float neg_lr = 0.0f;              // param.add_(grad, alpha=-lr)
};

struct SgdArrays {
  float* param = nullptr;
  const float* param_in = nullptr;  // as AdamArrays::param_in
  const void* grad = nullptr;
  float* momentum_buf = nullptr;
  void* out = nullptr;
  DType grad_dtype = DType::kFloat32;
  DType out_dtype = DType::kBFloat16;
  bool stream_out = false;  // as AdamArrays::stream_out
};

// Summation order of grad_sumsq (fixed, independent of ISA and thread count): elements are squared
// exactly in float64; each block of kStatsBlock elements is accumulated in 16 float64 lanes (lane =
// index within the block mod 16) in index order; the 16 lanes are combined pairwise (lane j += lane
// j+8, then j+4, j+2, j+1); the block sums are added in block order.
constexpr int64_t kStatsBlock = 16384;

// One implementation (one ISA). Each function processes elements [begin, end).
struct KernelTable {
  Isa isa;
  void (*adam)(const AdamArrays&, const AdamScalars&, int64_t begin, int64_t end);
  void (*sgd)(const SgdArrays&, const SgdScalars&, int64_t begin, int64_t end);
  // Sum of squares of block `block` (elements [block*kStatsBlock, min(n, (block+1)*kStatsBlock))).
  double (*sumsq_block)(const void* grad, DType dtype, int64_t n, int64_t block);
  // Conversion of fp32 values to out_dtype (the same rounding as the fused output), for tests.
  void (*convert)(const float* src, void* dst, DType dst_dtype, int64_t begin, int64_t end);
  // Square roots with the given rounding (to detect torch's and for tests).
  void (*sqrt)(const float* src, float* dst, SqrtKind kind, int64_t begin, int64_t end);
  // The memory traffic of a step without its arithmetic: p += g, m += g, v += g (4 reads and 3
  // writes of fp32 per element), for the bandwidth bound printed by benchmarks.
  void (*probe)(float* p, const float* g, float* m, float* v, int64_t begin, int64_t end);
};

// Software prefetch distance in bytes ahead of the fp32 streams (default kPrefetchBytes, which
// measured 10-20% faster than the hardware prefetchers alone on 100M-element steps here); a tuning
// knob for benchmarks (tierrt._native._set_prefetch_distance).
constexpr int64_t kPrefetchBytes = 2048;
extern std::atomic<int64_t> g_prefetch_bytes;

const KernelTable& scalar_kernels();
#if defined(__x86_64__) || defined(__i386__)
const KernelTable& avx2_kernels();
const KernelTable& avx512_kernels();
#endif

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false, avx512f = false, avx512bw = false, avx512vl = false,
       avx512dq = false, avx512bf16 = false, avx512fp16 = false;
};
const CpuFeatures& cpu_features();
// cpu_features().avx512bf16, set when the module loads (in a TU compiled for any x86-64, so that no
// AVX-512 code runs at load time).
extern const bool g_has_bf16_instruction;
// Whether this CPU can compute the given sqrt rounding (kRsqrt14 needs AVX512F and AVX512VL).
bool sqrt_kind_supported(SqrtKind kind);
bool isa_supported(Isa isa);
Isa best_isa();
// "auto" (TIERRT_CPU_ISA overrides the automatic choice), "avx512", "avx2", "scalar"; throws
// ConfigError for an unknown name or an ISA this CPU lacks.
const KernelTable& kernels_for(const std::string& isa);

}  // namespace tierrt::cpu

namespace tierrt::cpu {

// The hyper-parameters of one Adam / AdamW step as torch's Python code holds them (float64).
struct AdamParams {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
  int64_t step = 1;             // the step count after this step's increment (first step: 1)
  bool decoupled = true;        // AdamW (param.mul_) rather than Adam (L2 term added to the grad)
  bool maximize = false;
  double grad_scale = 1.0;      // the gradient is first multiplied by fp32(grad_scale)
  SqrtKind sqrt = SqrtKind::kIeee;
};

struct SgdParams {
  double lr = 1e-3, momentum = 0.0, dampening = 0.0, weight_decay = 0.0;
  bool nesterov = false, maximize = false, first_step = false;
  double grad_scale = 1.0;
};

// Derive the fp32 scalars exactly as torch derives and rounds them.
AdamScalars adam_scalars(const AdamParams& params);
SgdScalars sgd_scalars(const SgdParams& params);

// threads: 0 = every CPU this process may use; at most one thread per kMinPerThread elements.
// Elements are split into contiguous parts, a multiple of 64 elements (256 bytes of fp32) long, up to
// kPartsPerThread per thread, which the threads claim one at a time.
constexpr int64_t kMinPerThread = 32768;
// Steps whose weight output is at least this large store it with non-temporal stores (a tuning
// knob for benchmarks: tierrt._native._set_stream_out_bytes).
constexpr int64_t kStreamOutBytes = 4 << 20;
extern std::atomic<int64_t> g_stream_out_bytes;
constexpr int64_t kPartsPerThread = 4;
int resolve_threads(int threads);

void adam_step(const KernelTable& k, const AdamArrays& arrays, int64_t n, const AdamScalars& s,
               int threads);
void sgd_step(const KernelTable& k, const SgdArrays& arrays, int64_t n, const SgdScalars& s,
              int threads);
// Sum of squares (float64, in the order documented at kStatsBlock) and whether any element is inf
// or NaN (exactly when the sum is not finite: squares are never negative and cannot overflow).
double grad_sumsq(const KernelTable& k, const void* grad, DType dtype, int64_t n, int threads);
void convert_from_f32(const KernelTable& k, const float* src, void* dst, DType dtype, int64_t n,
                      int threads);
void sqrt_f32(const KernelTable& k, const float* src, float* dst, SqrtKind kind, int64_t n,
              int threads);
void memory_probe(const KernelTable& k, float* p, const float* g, float* m, float* v, int64_t n,
                  int threads);

}  // namespace tierrt::cpu
