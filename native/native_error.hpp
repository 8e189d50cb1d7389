// Errors raised by the native layer.
//
// C++ code throws tierrt::NativeError; the translator installed by module.cpp turns it into the
// Python exception class of the same name in tierrt.errors (the single definition of tierrt's error
// classes), passing the structured fields as keyword arguments so that Python code can read
// err.path, err.offset, err.nbytes, err.errno, err.tier, err.requested, ...
#pragma once

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <variant>

namespace tierrt {

class NativeError : public std::runtime_error {
 public:
  using Field = std::variant<int64_t, std::string>;

  // kind: the class name in tierrt.errors, e.g. "IOEngineError", "TierCapacityError", "ConfigError".
  NativeError(std::string kind, const std::string& message)
      : std::runtime_error(message), kind_(std::move(kind)) {}

  NativeError& with(const std::string& key, int64_t value) {
    fields_[key] = value;
    return *this;
  }
  NativeError& with(const std::string& key, const std::string& value) {
    fields_[key] = value;
    return *this;
  }

  const std::string& kind() const { return kind_; }
  const std::map<std::string, Field>& fields() const { return fields_; }

 private:
  std::string kind_;
  std::map<std::string, Field> fields_;
};

// Human-readable size, e.g. "1.50GiB", used in error messages so they read like the Python side.
std::string format_size(uint64_t nbytes);

}  // namespace tierrt
