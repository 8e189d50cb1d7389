// Python bindings of the CPU optimizer kernels (tierrt._native.adam_step, sgd_step, grad_stats,
// convert_from_f32, cpu_features). Memory crosses as integer addresses (tensor.data_ptr()) with
// element counts; tierrt/optim/kernels.py wraps them for torch tensors. Every call releases the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <utility>

#include "cpu_kernels.hpp"
#include "cpu_threads.hpp"
#include "native_error.hpp"

namespace py = pybind11;

namespace tierrt {
namespace {

using cpu::DType;

DType parse_dtype(const std::string& name, const char* what, const char* fn) {
  if (name == "float32" || name == "float" || name == "fp32") return DType::kFloat32;
  if (name == "bfloat16" || name == "bf16") return DType::kBFloat16;
  if (name == "float16" || name == "half" || name == "fp16") return DType::kFloat16;
  throw NativeError("ConfigError", std::string(fn) + ": unknown " + what + " '" + name +
                                       "'; expected 'float32', 'bfloat16' or 'float16'.")
      .with("dtype", name);
}

// Checks one memory argument: non-null and aligned to its element size when there are elements.
template <class T = void>
T* pointer(uintptr_t address, const char* name, size_t element_size, int64_t n, const char* fn) {
  if (n > 0 && address == 0) {
    throw NativeError("ConfigError", std::string(fn) + ": " + name + " is a null address but n = " +
                                         std::to_string(n) + " elements were given.")
        .with("argument", name);
  }
  if (address % element_size != 0) {
    char text[64];
    std::snprintf(text, sizeof(text), "0x%llx", static_cast<unsigned long long>(address));
    throw NativeError("ConfigError", std::string(fn) + ": " + name + " address " + text +
                                         " is not aligned to its element size (" +
                                         std::to_string(element_size) + " bytes).")
        .with("argument", name);
  }
  return reinterpret_cast<T*>(address);
}

void check_common(int64_t n, int threads, const char* fn) {
  if (n < 0) {
    throw NativeError("ConfigError", std::string(fn) + ": the element count n must not be negative, "
                                                       "got " + std::to_string(n) + ".")
        .with("n", n);
  }
  if (threads < 0 || threads > cpu::ThreadPool::kMaxThreads) {
    throw NativeError("ConfigError", std::string(fn) + ": threads must be 0 (every CPU) or 1.." +
                                         std::to_string(cpu::ThreadPool::kMaxThreads) + ", got " +
                                         std::to_string(threads) + ".")
        .with("threads", threads);
  }
}

// `halves`: also the two halves of a step around torch's own sqrt ("moments", "given"; see SqrtKind).
cpu::SqrtKind parse_sqrt(const std::string& name, const char* fn, bool halves = false) {
  cpu::SqrtKind kind;
  if (name == "ieee") {
    kind = cpu::SqrtKind::kIeee;
  } else if (name == "rsqrt14") {
    kind = cpu::SqrtKind::kRsqrt14;
  } else if (halves && name == "moments") {
    kind = cpu::SqrtKind::kMoments;
  } else if (halves && name == "given") {
    kind = cpu::SqrtKind::kGiven;
  } else {
    throw NativeError("ConfigError", std::string(fn) + ": unknown sqrt rounding '" + name +
                                         (halves ? "'; expected 'ieee', 'rsqrt14', 'moments' or 'given'."
                                                 : "'; expected 'ieee' or 'rsqrt14'."))
        .with("sqrt", name);
  }
  if (!cpu::sqrt_kind_supported(kind)) {
    throw NativeError("ConfigError", std::string(fn) + ": sqrt='" + name +
                                         "' needs AVX-512 (vrsqrt14ps), which this CPU lacks.")
        .with("sqrt", name);
  }
  return kind;
}

void adam_step_py(uintptr_t param, uintptr_t grad, uintptr_t exp_avg, uintptr_t exp_avg_sq,
                  int64_t n, double lr, double beta1, double beta2, double eps,
                  double weight_decay, int64_t step, bool decoupled, bool maximize,
                  uintptr_t amsgrad_max, const std::string& grad_dtype, double grad_scale,
                  uintptr_t out, const std::string& out_dtype, int threads,
                  const std::string& isa, const std::string& sqrt, uintptr_t param_in) {
  const char* fn = "adam_step";
  check_common(n, threads, fn);
  const cpu::SqrtKind sqrt_kind = parse_sqrt(sqrt, fn, true);
  if (step < 1) {
    throw NativeError("ConfigError", std::string(fn) + ": step counts this step and starts at 1 "
                                                       "(torch's state['step'] after its increment), "
                                                       "got " + std::to_string(step) + ".")
        .with("step", step);
  }
  const cpu::KernelTable& kernels = cpu::kernels_for(isa);
  cpu::AdamArrays a;
  a.grad_dtype = parse_dtype(grad_dtype, "grad_dtype", fn);
  a.out_dtype = parse_dtype(out_dtype, "out_dtype", fn);
  a.param = pointer<float>(param, "param", 4, n, fn);
  a.param_in = param_in ? pointer<const float>(param_in, "param_in", 4, n, fn) : nullptr;
  a.grad = pointer<const void>(grad, "grad", cpu::dtype_size(a.grad_dtype), n, fn);
  a.exp_avg = pointer<float>(exp_avg, "exp_avg", 4, n, fn);
  a.exp_avg_sq = pointer<float>(exp_avg_sq, "exp_avg_sq", 4, n, fn);
  a.max_exp_avg_sq = amsgrad_max ? pointer<float>(amsgrad_max, "amsgrad_max", 4, n, fn) : nullptr;
  a.out = out ? pointer<void>(out, "out", cpu::dtype_size(a.out_dtype), n, fn) : nullptr;
  cpu::AdamParams p;
  p.lr = lr;
  p.beta1 = beta1;
  p.beta2 = beta2;
  p.eps = eps;
  p.weight_decay = weight_decay;
  p.step = step;
  p.decoupled = decoupled;
  p.maximize = maximize;
  p.grad_scale = grad_scale;
  p.sqrt = sqrt_kind;
  cpu::adam_step(kernels, a, n, cpu::adam_scalars(p), threads);
}

void sgd_step_py(uintptr_t param, uintptr_t grad, uintptr_t momentum_buf, int64_t n, double lr,
                 double momentum, double dampening, bool nesterov, double weight_decay,
                 bool maximize, bool first_step, const std::string& grad_dtype, double grad_scale,
                 uintptr_t out, const std::string& out_dtype, int threads, const std::string& isa,
                 uintptr_t param_in) {
  const char* fn = "sgd_step";
  check_common(n, threads, fn);
  if (nesterov && (momentum <= 0.0 || dampening != 0.0)) {
    throw NativeError("ConfigError", std::string(fn) + ": Nesterov momentum requires a momentum > 0 "
                                                       "and zero dampening (as torch.optim.SGD).");
  }
  const cpu::KernelTable& kernels = cpu::kernels_for(isa);
  cpu::SgdArrays a;
  a.grad_dtype = parse_dtype(grad_dtype, "grad_dtype", fn);
  a.out_dtype = parse_dtype(out_dtype, "out_dtype", fn);
  a.param = pointer<float>(param, "param", 4, n, fn);
  a.param_in = param_in ? pointer<const float>(param_in, "param_in", 4, n, fn) : nullptr;
  a.grad = pointer<const void>(grad, "grad", cpu::dtype_size(a.grad_dtype), n, fn);
  if (momentum != 0.0) {
    a.momentum_buf = pointer<float>(momentum_buf, "momentum_buf", 4, n, fn);
  }
  a.out = out ? pointer<void>(out, "out", cpu::dtype_size(a.out_dtype), n, fn) : nullptr;
  cpu::SgdParams p;
  p.lr = lr;
  p.momentum = momentum;
  p.dampening = dampening;
  p.weight_decay = weight_decay;
  p.nesterov = nesterov;
  p.maximize = maximize;
  p.first_step = first_step;
  p.grad_scale = grad_scale;
  cpu::sgd_step(kernels, a, n, cpu::sgd_scalars(p), threads);
}

std::pair<double, bool> grad_stats_py(uintptr_t grad, int64_t n, const std::string& grad_dtype,
                                      int threads, const std::string& isa) {
  const char* fn = "grad_stats";
  check_common(n, threads, fn);
  const cpu::KernelTable& kernels = cpu::kernels_for(isa);
  const DType dtype = parse_dtype(grad_dtype, "grad_dtype", fn);
  const void* g = pointer<const void>(grad, "grad", cpu::dtype_size(dtype), n, fn);
  const double sumsq = cpu::grad_sumsq(kernels, g, dtype, n, threads);
  return {sumsq, !std::isfinite(sumsq)};
}

void convert_py(uintptr_t src, uintptr_t dst, int64_t n, const std::string& dtype_name, int threads,
                const std::string& isa) {
  const char* fn = "convert_from_f32";
  check_common(n, threads, fn);
  const cpu::KernelTable& kernels = cpu::kernels_for(isa);
  const DType dtype = parse_dtype(dtype_name, "dtype", fn);
  const float* s = pointer<const float>(src, "src", 4, n, fn);
  void* d = pointer<void>(dst, "dst", cpu::dtype_size(dtype), n, fn);
  cpu::convert_from_f32(kernels, s, d, dtype, n, threads);
}

void sqrt_py(uintptr_t src, uintptr_t dst, int64_t n, const std::string& sqrt, int threads,
             const std::string& isa) {
  const char* fn = "sqrt_f32";
  check_common(n, threads, fn);
  const cpu::SqrtKind kind = parse_sqrt(sqrt, fn);
  const cpu::KernelTable& kernels = cpu::kernels_for(isa);
  const float* s = pointer<const float>(src, "src", 4, n, fn);
  float* d = pointer<float>(dst, "dst", 4, n, fn);
  cpu::sqrt_f32(kernels, s, d, kind, n, threads);
}

void probe_py(uintptr_t p, uintptr_t g, uintptr_t m, uintptr_t v, int64_t n, int threads,
              const std::string& isa) {
  const char* fn = "memory_probe";
  check_common(n, threads, fn);
  const cpu::KernelTable& kernels = cpu::kernels_for(isa);
  cpu::memory_probe(kernels, pointer<float>(p, "p", 4, n, fn), pointer<const float>(g, "g", 4, n, fn),
                    pointer<float>(m, "m", 4, n, fn), pointer<float>(v, "v", 4, n, fn), n, threads);
}

py::dict cpu_features_py() {
  const cpu::CpuFeatures& f = cpu::cpu_features();
  py::dict d;
  d["avx2"] = f.avx2;
  d["fma"] = f.fma;
  d["f16c"] = f.f16c;
  d["avx512f"] = f.avx512f;
  d["avx512bw"] = f.avx512bw;
  d["avx512vl"] = f.avx512vl;
  d["avx512dq"] = f.avx512dq;
  d["avx512bf16"] = f.avx512bf16;
  d["avx512fp16"] = f.avx512fp16;
  py::list isas;
  for (cpu::Isa isa : {cpu::Isa::kAvx512, cpu::Isa::kAvx2, cpu::Isa::kScalar}) {
    if (cpu::isa_supported(isa)) isas.append(cpu::isa_name(isa));
  }
  d["available_isas"] = isas;
  d["best_isa"] = cpu::isa_name(cpu::best_isa());
  d["chosen_isa"] = cpu::isa_name(cpu::kernels_for("auto").isa);
  d["threads"] = cpu::available_cpus();
  return d;
}

}  // namespace

void bind_cpu_kernels(py::module_& m) {
  using py::arg;
  m.def("adam_step", &adam_step_py, arg("param"), arg("grad"), arg("exp_avg"), arg("exp_avg_sq"),
        arg("n"), py::kw_only(), arg("lr"), arg("beta1"), arg("beta2"), arg("eps"),
        arg("weight_decay"), arg("step"), arg("decoupled") = true, arg("maximize") = false,
        arg("amsgrad_max") = 0, arg("grad_dtype") = "float32", arg("grad_scale") = 1.0,
        arg("out") = 0, arg("out_dtype") = "bfloat16", arg("threads") = 0, arg("isa") = "auto",
        arg("sqrt") = "ieee", arg("param_in") = 0, py::call_guard<py::gil_scoped_release>(),
        R"doc(One Adam (decoupled=False) or AdamW (decoupled=True) step over n fp32 elements, in place.

param, exp_avg, exp_avg_sq (and amsgrad_max when non-zero: AMSGrad's max_exp_avg_sq) are addresses of
n float32 values; grad of n grad_dtype values ('float32', 'bfloat16', 'float16'), read only. step is
this step's count (1 on the first step). The gradient is first multiplied by fp32(grad_scale). When out
is non-zero the updated weights are also written there as out_dtype in the same pass (round to nearest
even, torch's NaN encodings). The result is bitwise equal to torch.optim.Adam / AdamW (single-tensor
CPU path) given the same fp32 gradient, when sqrt names the rounding of torch's Tensor.sqrt() in this
process ('ieee', or 'rsqrt14' for torch with MKL on an AVX-512 CPU; tierrt.optim.kernels detects it).
threads=0 uses every CPU; isa: 'auto', 'avx512', 'avx2', 'scalar'. When param_in is non-zero the step is
out of place: the weights are read from param_in (n float32, not written) and the result is written to
param. Releases the GIL.)doc");
  m.def("sgd_step", &sgd_step_py, arg("param"), arg("grad"), arg("momentum_buf"), arg("n"),
        py::kw_only(), arg("lr"), arg("momentum") = 0.0, arg("dampening") = 0.0,
        arg("nesterov") = false, arg("weight_decay") = 0.0, arg("maximize") = false,
        arg("first_step") = false, arg("grad_dtype") = "float32", arg("grad_scale") = 1.0,
        arg("out") = 0, arg("out_dtype") = "bfloat16", arg("threads") = 0, arg("isa") = "auto",
        arg("param_in") = 0, py::call_guard<py::gil_scoped_release>(),
        R"doc(One SGD step over n fp32 elements, in place, bitwise equal to torch.optim.SGD.

momentum_buf (n float32, used when momentum != 0) is written from the gradient when first_step is
True (torch's buffer is None on the first step) and updated otherwise. Other arguments as adam_step.)doc");
  m.def("grad_stats", &grad_stats_py, arg("grad"), arg("n"), arg("grad_dtype") = "float32",
        arg("threads") = 0, arg("isa") = "auto", py::call_guard<py::gil_scoped_release>(),
        R"doc(Returns (sum of squares as float64, has_inf_or_nan) of n gradient values in one pass.

The sum is accumulated in a fixed order (float64 lanes per 16384-element block, blocks in order), so it
does not depend on the thread count or the instruction set.)doc");
  m.def("convert_from_f32", &convert_py, arg("src"), arg("dst"), arg("n"), py::kw_only(),
        arg("dtype") = "bfloat16", arg("threads") = 0, arg("isa") = "auto",
        py::call_guard<py::gil_scoped_release>(),
        "Converts n float32 values to dtype with the rounding of the fused weight output.");
  m.def("sqrt_f32", &sqrt_py, arg("src"), arg("dst"), arg("n"), py::kw_only(), arg("sqrt") = "ieee",
        arg("threads") = 0, arg("isa") = "auto", py::call_guard<py::gil_scoped_release>(),
        "Square roots of n float32 values with the given rounding ('ieee' or 'rsqrt14').");
  m.def("memory_probe", &probe_py, arg("p"), arg("g"), arg("m"), arg("v"), arg("n"), py::kw_only(),
        arg("threads") = 0, arg("isa") = "auto", py::call_guard<py::gil_scoped_release>(),
        "The memory traffic of an Adam step without its arithmetic (p += g, m += g, v += g over n "
        "float32): 4 reads and 3 writes per element, for the bandwidth bound of benchmarks.");
  m.def(
      "_set_prefetch_distance",
      [](int64_t bytes) { return cpu::g_prefetch_bytes.exchange(bytes); }, arg("bytes"),
      "Tuning (benchmarks only): software prefetch distance of the steps in bytes; returns the old one.");
  m.def(
      "_set_stream_out_bytes",
      [](int64_t bytes) { return cpu::g_stream_out_bytes.exchange(bytes); }, arg("bytes"),
      "Tuning (benchmarks only): weight outputs of at least this many bytes use non-temporal stores; "
      "returns the old threshold.");
  m.def("cpu_features", &cpu_features_py,
        "The CPU's vector features, the instruction sets the kernels can use and the one 'auto' picks.");
}

}  // namespace tierrt
