// Helpers shared by the allocator and host-arena bindings: argument conversion with ConfigError.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "native_error.hpp"

namespace tierrt {

// A Python int as a non-negative byte count or offset; anything else raises ConfigError naming `what`.
inline uint64_t size_arg(pybind11::handle value, const char* what) {
  // ints and anything with __index__ (numpy integers); never bool or float
  if (pybind11::isinstance<pybind11::bool_>(value) || !PyIndex_Check(value.ptr())) {
    throw NativeError("ConfigError", std::string(what) + " must be an int of bytes, got " +
                                         std::string(pybind11::repr(value)));
  }
  pybind11::object index = pybind11::reinterpret_steal<pybind11::object>(PyNumber_Index(value.ptr()));
  if (!index) throw pybind11::error_already_set();
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
  if (overflow != 0 || v < 0) {
    throw NativeError("ConfigError", std::string(what) + " must be between 0 and 2**63-1, got " +
                                         std::string(pybind11::repr(value)));
  }
  return static_cast<uint64_t>(v);
}

}  // namespace tierrt
