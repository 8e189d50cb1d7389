// Helpers shared by the allocator and host-arena bindings: argument conversion with ConfigError.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "native_error.hpp"

namespace tierrt {

// A Python int as a non-negative byte count or offset; anything else raises ConfigError naming `what`.
inline uint64_t size_arg(pybind11::handle value, const char* what) {
  if (!pybind11::isinstance<pybind11::int_>(value) || pybind11::isinstance<pybind11::bool_>(value)) {
    throw NativeError("ConfigError", std::string(what) + " must be an int of bytes, got " +
                                         std::string(pybind11::repr(value)));
  }
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(value.ptr(), &overflow);
  if (overflow != 0 || v < 0) {
    throw NativeError("ConfigError", std::string(what) + " must be between 0 and 2**63-1, got " +
                                         std::string(pybind11::repr(value)));
  }
  return static_cast<uint64_t>(v);
}

}  // namespace tierrt
