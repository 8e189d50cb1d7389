// The tierrt._native extension module: registers each component's bindings and the translation of
// tierrt::NativeError into the exception classes of tierrt.errors.
#include <pybind11/pybind11.h>

#include <cstdio>

#include "native_error.hpp"

namespace py = pybind11;

namespace tierrt {

std::string format_size(uint64_t nbytes) {
  static const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double value = static_cast<double>(nbytes);
  int unit = 0;
  while (value >= 1024.0 && unit < 5) {
    value /= 1024.0;
    ++unit;
  }
  char text[64];
  if (unit == 0) {
    std::snprintf(text, sizeof(text), "%llu%s", static_cast<unsigned long long>(nbytes), units[unit]);
  } else {
    std::snprintf(text, sizeof(text), "%.2f%s", value, units[unit]);
  }
  return text;
}

// Each component defines its binder in its own translation unit.
void bind_allocator(py::module_& m);
void bind_host_arena(py::module_& m);
void bind_io_engine(py::module_& m);
void bind_cpu_kernels(py::module_& m);
void bind_checksum(py::module_& m);

}  // namespace tierrt

PYBIND11_MODULE(_native, m) {
  m.doc() = "tierrt native layer: host arenas, allocator, async I/O engine, CPU optimizer kernels";

  py::register_exception_translator([](std::exception_ptr pending) {
    try {
      if (pending) std::rethrow_exception(pending);
    } catch (const tierrt::NativeError& err) {
      py::gil_scoped_acquire gil;
      py::object errors = py::module_::import("tierrt.errors");
      py::object cls = errors.attr(err.kind().c_str());
      py::dict kwargs;
      for (const auto& [key, value] : err.fields()) {
        if (std::holds_alternative<int64_t>(value)) {
          kwargs[py::str(key)] = std::get<int64_t>(value);
        } else {
          kwargs[py::str(key)] = std::get<std::string>(value);
        }
      }
      py::object exc = cls(py::str(err.what()), **kwargs);
      PyErr_SetObject(cls.ptr(), exc.ptr());
    }
  });

  tierrt::bind_allocator(m);
  tierrt::bind_host_arena(m);
  tierrt::bind_io_engine(m);
  tierrt::bind_cpu_kernels(m);
  tierrt::bind_checksum(m);

#ifdef TIERRT_HAVE_LIBURING
  m.attr("HAVE_LIBURING") = true;
#else
  m.attr("HAVE_LIBURING") = false;
#endif
}
