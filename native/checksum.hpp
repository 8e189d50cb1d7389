// Integrity checksums of swapped data: CRC-32C (Castagnoli) over four interleaved lanes.
//
// The buffer's 8-byte words are dealt round-robin to four lanes (word i to lane i % 4), each lane a
// CRC-32C chain, so four independent crc32 instructions are in flight per cycle on x86-64 with
// SSE4.2 (about 4x the speed of one chain); the bytes after the last whole group of four words go to
// lane 0 byte by byte. The result is the CRC-32C of the four lane values and the length, so the
// same bytes in another order or length give another value. Not the plain CRC-32C of the buffer:
// it is only compared with itself (what was written against what is read back).
#pragma once

#include <cstddef>
#include <cstdint>

namespace tierrt {

// The checksum of n bytes at data. Uses SSE4.2's crc32 instruction when the CPU has it, a table
// otherwise (same result).
uint32_t checksum(const void* data, size_t n);

// Which implementation checksum() uses on this CPU: "sse4.2" or "table".
const char* checksum_impl();

}  // namespace tierrt
