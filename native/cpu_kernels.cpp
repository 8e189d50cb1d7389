// Run-time dispatch, scalar derivation and threading of the CPU optimizer kernels.

// GCC contracts a*b + c into an FMA by default in C++ wherever the target has FMA; the kernels must
// use an FMA exactly where ATen does (explicit fmadd / std::fma) and nowhere else, and compute the
// float64 scalars as Python does. This applies to everything below, the included headers as well.
#pragma GCC optimize("fp-contract=off")
#include "cpu_kernels.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <vector>

#include "cpu_threads.hpp"
#include "native_error.hpp"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace tierrt::cpu {

std::atomic<int64_t> g_prefetch_bytes{kPrefetchBytes};
std::atomic<int64_t> g_stream_out_bytes{kStreamOutBytes};

const char* dtype_name(DType d) {
  switch (d) {
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kFloat16:
      return "float16";
    default:
      return "float32";
  }
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = [] {
    CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    // __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 register state.
    f.avx2 = __builtin_cpu_supports("avx2");
    f.fma = __builtin_cpu_supports("fma");
    f.avx512f = __builtin_cpu_supports("avx512f");
    f.avx512bw = __builtin_cpu_supports("avx512bw");
    f.avx512vl = __builtin_cpu_supports("avx512vl");
    f.avx512dq = __builtin_cpu_supports("avx512dq");
    unsigned eax, ebx, ecx, edx;
    if (__get_cpuid(1, &eax, &ebx, &ecx, &edx)) f.f16c = f.avx2 && (ecx & (1u << 29)) != 0;
    if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) {
      f.avx512fp16 = f.avx512f && (edx & (1u << 23)) != 0;
    }
    if (__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) {
      f.avx512bf16 = f.avx512f && (eax & (1u << 5)) != 0;
    }
#endif
    return f;
  }();
  return features;
}

bool isa_supported(Isa isa) {
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case Isa::kAvx512:
      return f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.fma && f.f16c && f.avx2;
    case Isa::kAvx2:
      return f.avx2 && f.fma && f.f16c;
    default:
      return true;
  }
}

const bool g_has_bf16_instruction = cpu_features().avx512bf16;

bool sqrt_kind_supported(SqrtKind kind) {
  // vrsqrt14ps, in its 512-bit (AVX512F) and 256-bit (AVX512VL, used by the AVX2 path) forms.
  return kind != SqrtKind::kRsqrt14 || (cpu_features().avx512f && cpu_features().avx512vl);
}

Isa best_isa() {
  if (isa_supported(Isa::kAvx512)) return Isa::kAvx512;
  if (isa_supported(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kScalar;
}

namespace {

const KernelTable& table_for(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  if (isa == Isa::kAvx512) return avx512_kernels();
  if (isa == Isa::kAvx2) return avx2_kernels();
#endif
  return scalar_kernels();
}

Isa parse_isa(const std::string& name, const char* origin) {
  if (name == "avx512") return Isa::kAvx512;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "scalar") return Isa::kScalar;
  throw NativeError("ConfigError", std::string("unknown instruction set '") + name + "' in " +
                                       origin + "; expected 'auto', 'avx512', 'avx2' or 'scalar'.")
      .with("isa", name);
}

}  // namespace

const KernelTable& kernels_for(const std::string& name) {
  Isa isa;
  const char* origin = "the isa argument";
  if (name == "auto") {
    const char* env = std::getenv("TIERRT_CPU_ISA");
    if (env == nullptr || *env == '\0' || std::string(env) == "auto") return table_for(best_isa());
    isa = parse_isa(env, "TIERRT_CPU_ISA");
    origin = "TIERRT_CPU_ISA";
  } else {
    isa = parse_isa(name, origin);
  }
  if (!isa_supported(isa)) {
    throw NativeError("ConfigError", std::string("instruction set '") + isa_name(isa) +
                                         "' was requested (" + origin +
                                         ") but this CPU does not support it; the best available "
                                         "is '" + isa_name(best_isa()) + "'.")
        .with("isa", isa_name(isa));
  }
  return table_for(isa);
}

AdamScalars adam_scalars(const AdamParams& p) {
  // torch/optim/adam.py (_single_tensor_adam), in float64 as Python computes them; ATen rounds each
  // Python float to fp32 where it meets an fp32 tensor.
  AdamScalars s;
  s.has_grad_mul = p.grad_scale != 1.0 || p.maximize;
  const float scale = static_cast<float>(p.grad_scale);
  s.grad_mul = p.maximize ? -scale : scale;  // -(g * s) == g * (-s): rounding is sign-symmetric
  if (p.weight_decay != 0.0) {
    s.wd_mode = p.decoupled ? WeightDecay::kDecoupled : WeightDecay::kL2;
    s.wd = p.decoupled ? static_cast<float>(1.0 - p.lr * p.weight_decay)
                       : static_cast<float>(p.weight_decay);
  }
  const float w = static_cast<float>(1.0 - p.beta1);
  s.lerp_small = std::fabs(w) < 0.5f;
  s.lerp_coeff = s.lerp_small ? w : w - 1.0f;
  s.beta2 = static_cast<float>(p.beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - p.beta2);
  const double step = static_cast<double>(p.step);
  const double bias_correction1 = 1.0 - std::pow(p.beta1, step);
  const double bias_correction2 = 1.0 - std::pow(p.beta2, step);
  const double step_size = p.lr / bias_correction1;
  s.bc2_sqrt = static_cast<float>(std::pow(bias_correction2, 0.5));  // Python: bc2 ** 0.5
  s.sqrt = p.sqrt;
  s.eps = static_cast<float>(p.eps);
  s.neg_step_size = static_cast<float>(-step_size);
  return s;
}

SgdScalars sgd_scalars(const SgdParams& p) {
  SgdScalars s;
  s.has_grad_mul = p.grad_scale != 1.0 || p.maximize;
  const float scale = static_cast<float>(p.grad_scale);
  s.grad_mul = p.maximize ? -scale : scale;
  s.has_wd = p.weight_decay != 0.0;
  s.wd = static_cast<float>(p.weight_decay);
  s.has_momentum = p.momentum != 0.0;
  s.first_step = p.first_step;
  s.nesterov = p.nesterov;
  s.momentum = static_cast<float>(p.momentum);
  s.one_minus_dampening = static_cast<float>(1.0 - p.dampening);
  s.neg_lr = static_cast<float>(-p.lr);
  return s;
}

int resolve_threads(int threads) {
  if (threads <= 0) return available_cpus();
  return std::min(threads, ThreadPool::kMaxThreads);
}

namespace {

// Splits [0, n) into contiguous parts, each a multiple of `align` elements long (except the last),
// and calls body(begin, end) for each on up to `threads` threads (each thread handles at least
// min_chunk elements). Threads claim the parts one by one, several per thread, so that a thread
// preempted by other work on the same cores holds back only its current part.
template <class Body>
void parallel_chunks(int64_t n, int threads, int64_t align, int64_t min_chunk, const Body& body) {
  if (n <= 0) return;
  const int64_t t = std::min<int64_t>(resolve_threads(threads), std::max<int64_t>(1, n / min_chunk));
  if (t <= 1) {
    body(0, n);
    return;
  }
  int64_t parts = std::min<int64_t>(t * kPartsPerThread, std::max<int64_t>(t, n / (min_chunk * 4)));
  int64_t chunk = (n + parts - 1) / parts;
  chunk = (chunk + align - 1) / align * align;
  parts = (n + chunk - 1) / chunk;
  const std::function<void(int)> task = [&](int part) {
    const int64_t begin = part * chunk;
    body(begin, std::min(n, begin + chunk));
  };
  ThreadPool::instance().run(static_cast<int>(t), static_cast<int>(parts), task);
}

}  // namespace

void adam_step(const KernelTable& k, const AdamArrays& arrays, int64_t n, const AdamScalars& s,
               int threads) {
  AdamArrays a = arrays;
  a.stream_out = a.out != nullptr && n * static_cast<int64_t>(dtype_size(a.out_dtype)) >= g_stream_out_bytes.load();
  parallel_chunks(n, threads, 64, kMinPerThread,
                  [&](int64_t begin, int64_t end) { k.adam(a, s, begin, end); });
}

void sgd_step(const KernelTable& k, const SgdArrays& arrays, int64_t n, const SgdScalars& s,
              int threads) {
  SgdArrays a = arrays;
  a.stream_out = a.out != nullptr && n * static_cast<int64_t>(dtype_size(a.out_dtype)) >= g_stream_out_bytes.load();
  parallel_chunks(n, threads, 64, kMinPerThread,
                  [&](int64_t begin, int64_t end) { k.sgd(a, s, begin, end); });
}

double grad_sumsq(const KernelTable& k, const void* grad, DType dtype, int64_t n, int threads) {
  if (n <= 0) return 0.0;
  const int64_t blocks = (n + kStatsBlock - 1) / kStatsBlock;
  std::vector<double> partial(static_cast<size_t>(blocks));
  // Parts get whole blocks; the block sums are then added in block order, so the result does not
  // depend on the number of threads.
  parallel_chunks(blocks, threads, 1, std::max<int64_t>(1, kMinPerThread * 4 / kStatsBlock),
                  [&](int64_t begin, int64_t end) {
                    for (int64_t b = begin; b < end; ++b) partial[b] = k.sumsq_block(grad, dtype, n, b);
                  });
  double total = 0.0;
  for (double value : partial) total += value;
  return total;
}

void convert_from_f32(const KernelTable& k, const float* src, void* dst, DType dtype, int64_t n,
                      int threads) {
  parallel_chunks(n, threads, 64, kMinPerThread * 2,
                  [&](int64_t begin, int64_t end) { k.convert(src, dst, dtype, begin, end); });
}

void sqrt_f32(const KernelTable& k, const float* src, float* dst, SqrtKind kind, int64_t n,
              int threads) {
  parallel_chunks(n, threads, 64, kMinPerThread * 2,
                  [&](int64_t begin, int64_t end) { k.sqrt(src, dst, kind, begin, end); });
}

void memory_probe(const KernelTable& k, float* p, const float* g, float* m, float* v, int64_t n,
                  int threads) {
  parallel_chunks(n, threads, 64, kMinPerThread,
                  [&](int64_t begin, int64_t end) { k.probe(p, g, m, v, begin, end); });
}

}  // namespace tierrt::cpu
