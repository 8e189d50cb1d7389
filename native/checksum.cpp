// CRC-32C lanes for swap-data integrity (see checksum.hpp), and their Python binding.
#include "checksum.hpp"

#include <pybind11/pybind11.h>

#include <array>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <nmmintrin.h>
#define TIERRT_X86 1
#endif

namespace py = pybind11;

namespace tierrt {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // CRC-32C, reflected

std::array<uint32_t, 256> make_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ ((c & 1u) ? kPoly : 0u);
    table[i] = c;
  }
  return table;
}

const std::array<uint32_t, 256>& table() {
  static const std::array<uint32_t, 256> t = make_table();
  return t;
}

inline uint32_t table_u8(uint32_t crc, uint8_t byte) { return table()[(crc ^ byte) & 0xFFu] ^ (crc >> 8); }

inline uint32_t table_u64(uint32_t crc, uint64_t word) {
  for (int k = 0; k < 8; ++k) crc = table_u8(crc, static_cast<uint8_t>(word >> (8 * k)));
  return crc;
}

// The lane structure (see checksum.hpp); CRC_U64 and CRC_U8 are the word and byte steps. A macro,
// not a template over the steps: the instruction's version must be inlined into a function compiled
// for SSE4.2, which a template instantiated outside such a function would not be.
#define TIERRT_CHECKSUM_LANES(CRC_U64, CRC_U8)                      \
  const uint8_t* p = static_cast<const uint8_t*>(data);             \
  uint32_t crc[4] = {~0u, ~0u, ~0u, ~0u};                           \
  for (size_t g = n / 32; g > 0; --g, p += 32) {                    \
    uint64_t w[4];                                                  \
    std::memcpy(w, p, 32);                                          \
    crc[0] = CRC_U64(crc[0], w[0]);                                 \
    crc[1] = CRC_U64(crc[1], w[1]);                                 \
    crc[2] = CRC_U64(crc[2], w[2]);                                 \
    crc[3] = CRC_U64(crc[3], w[3]);                                 \
  }                                                                 \
  for (size_t rest = n % 32; rest > 0; --rest) crc[0] = CRC_U8(crc[0], *p++); \
  uint32_t out = ~0u;                                               \
  for (uint32_t lane : crc) out = CRC_U64(out, static_cast<uint64_t>(~lane)); \
  out = CRC_U64(out, static_cast<uint64_t>(n));                     \
  return ~out;

uint32_t checksum_table(const void* data, size_t n) { TIERRT_CHECKSUM_LANES(table_u64, table_u8) }

#ifdef TIERRT_X86
#define TIERRT_SSE_U64(crc, word) static_cast<uint32_t>(_mm_crc32_u64((crc), (word)))
__attribute__((target("sse4.2"))) uint32_t checksum_sse42(const void* data, size_t n) {
  TIERRT_CHECKSUM_LANES(TIERRT_SSE_U64, _mm_crc32_u8)
}
#undef TIERRT_SSE_U64

bool has_sse42() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2") != 0;
  }();
  return has;
}
#endif
#undef TIERRT_CHECKSUM_LANES

}  // namespace

uint32_t checksum(const void* data, size_t n) {
#ifdef TIERRT_X86
  if (has_sse42()) return checksum_sse42(data, n);
#endif
  return checksum_table(data, n);
}

const char* checksum_impl() {
#ifdef TIERRT_X86
  if (has_sse42()) return "sse4.2";
#endif
  return "table";
}

void bind_checksum(py::module_& m) {
  m.def(
      "checksum",
      [](uintptr_t address, int64_t nbytes, bool table_only) -> uint32_t {
        if (nbytes < 0) throw py::value_error("checksum: nbytes must be >= 0");
        if (nbytes > 0 && address == 0) throw py::value_error("checksum: null address");
        const void* data = reinterpret_cast<const void*>(address);
        if (table_only) return checksum_table(data, static_cast<size_t>(nbytes));
        return checksum(data, static_cast<size_t>(nbytes));
      },
      py::arg("address"), py::arg("nbytes"), py::kw_only(), py::arg("table_only") = false,
      py::call_guard<py::gil_scoped_release>(),
      R"doc(The integrity checksum (CRC-32C over four interleaved lanes, see native/checksum.hpp) of nbytes
bytes at the integer address. table_only=True uses the portable table implementation (the same value;
for tests). Releases the GIL.)doc");
  m.def("checksum_impl", &checksum_impl, "The checksum's implementation on this CPU: 'sse4.2' or 'table'.");
}

}  // namespace tierrt
