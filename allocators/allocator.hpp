// Offset allocator over an abstract range [0, capacity).
//
// tierrt uses one of these per host arena (offsets into the mmap'd region) and one per NVMe swap file
// (extents inside the file), so it manages offsets, never memory. Requests are rounded up only to the
// alignment (a power of two, 4096 by default). Placement is best fit: the smallest free extent that
// holds the request, the lowest offset among equals, carved from its front; a freed range is merged
// with its free neighbours at once, so the free list never holds two adjacent extents. Both
// operations are O(log n) in the number of free extents and allocations, under one mutex: the class
// is safe to call from several threads.
//
// A second, independent tool is plan_static(): the offset planner for buffers whose lifetimes are
// known ahead (from a traced step). It assigns every buffer an offset once, so that buffers alive at
// the same time never overlap, and returns the peak (the end of the highest buffer).
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <set>
#include <map>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace tierrt {

struct AllocatorStats {
  uint64_t capacity = 0;
  uint64_t alignment = 0;
  uint64_t in_use = 0;        // bytes held by live allocations (sizes rounded to the alignment)
  uint64_t peak_in_use = 0;   // max of in_use since creation or reset_peak()
  uint64_t high_water = 0;    // max end offset ever allocated: the footprint actually touched
  uint64_t free = 0;          // capacity - in_use
  uint64_t largest_free = 0;  // the largest request that would succeed now
  uint64_t free_extents = 0;  // number of free extents (1 when nothing is allocated)
  double fragmentation = 0;   // 1 - largest_free / free (0 when free == 0)
  uint64_t allocations = 0;   // live allocations
  uint64_t total_allocs = 0;
  uint64_t total_frees = 0;
};

class Allocator {
 public:
  // capacity > 0, alignment a power of two; otherwise throws ConfigError. name is the tier name used
  // in error messages ("dram", "nvme:/mnt/x/swap0", ...).
  explicit Allocator(uint64_t capacity, uint64_t alignment = 4096, std::string name = "");

  Allocator(const Allocator&) = delete;
  Allocator& operator=(const Allocator&) = delete;

  // Offset of a new range of nbytes (rounded up to the alignment). Throws TierCapacityError (fields
  // tier, requested, free, largest_free, budget) when no free extent holds it, ConfigError when
  // nbytes == 0.
  // from_top: best fit too, but the highest offset among equal sizes, carved from the extent's back.
  // Callers put short-lived buffers at the top and long-lived ones at the bottom, so that the two
  // populations do not interleave and fragment each other.
  uint64_t alloc(uint64_t nbytes, bool from_top = false);
  // Like alloc() but returns nullopt instead of throwing TierCapacityError.
  std::optional<uint64_t> try_alloc(uint64_t nbytes, bool from_top = false);
  // Returns the range starting at offset. Throws ConfigError when no live allocation starts there.
  void free(uint64_t offset);
  // Same as free() but reports an unknown offset by returning false (for destructors).
  bool free_noexcept(uint64_t offset) noexcept;
  // Size reserved for the allocation at offset (rounded to the alignment); ConfigError if unknown.
  uint64_t size_of(uint64_t offset) const;

  uint64_t capacity() const { return capacity_; }
  uint64_t alignment() const { return alignment_; }
  const std::string& name() const { return name_; }
  uint64_t round_up(uint64_t nbytes) const { return (nbytes + alignment_ - 1) & ~(alignment_ - 1); }

  AllocatorStats stats() const;
  // peak_in_use := in_use, high_water := the current end of the highest live allocation.
  void reset_peak();

  // Introspection for tests and reports: free extents and live allocations as (offset, size), by offset.
  std::vector<std::pair<uint64_t, uint64_t>> free_extents() const;
  std::vector<std::pair<uint64_t, uint64_t>> live_allocations() const;

 private:
  bool alloc_locked(uint64_t rounded, uint64_t* offset, bool from_top = false);
  uint64_t current_end_locked() const;
  [[noreturn]] void throw_capacity(uint64_t nbytes) const;

  const uint64_t capacity_;
  const uint64_t alignment_;
  const std::string name_;

  mutable std::mutex mutex_;
  std::set<std::pair<uint64_t, uint64_t>> by_size_;  // free extents as (size, offset)
  std::map<uint64_t, uint64_t> by_offset_;           // free extents: offset -> size
  std::unordered_map<uint64_t, uint64_t> live_;      // live allocations: offset -> rounded size
  uint64_t in_use_ = 0;
  uint64_t peak_in_use_ = 0;
  uint64_t high_water_ = 0;
  uint64_t total_allocs_ = 0;
  uint64_t total_frees_ = 0;
};

// Static offset planning for buffers with known lifetimes [first_use[i], last_use[i]] (inclusive
// time steps). Sizes are rounded up to the alignment; zero-sized buffers get offset 0 and take no
// space. Returns the offsets and the peak (max end offset). Buffers whose lifetimes intersect never
// overlap in [offset, offset + rounded size). Several greedy orders (by size, by lifetime length,
// by size x lifetime) are tried with best-fit gap placement; the plan with the lowest peak wins.
// Throws ConfigError on mismatched lengths or first_use > last_use. O(n^2 log n) for n buffers.
std::pair<std::vector<uint64_t>, uint64_t> plan_static(const std::vector<uint64_t>& sizes,
                                                        const std::vector<int64_t>& first_use,
                                                        const std::vector<int64_t>& last_use,
                                                        uint64_t alignment = 4096);

}  // namespace tierrt
