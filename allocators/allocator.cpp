// Best-fit offset allocator with immediate coalescing, and the static offset planner.
#include "allocator.hpp"

#include <algorithm>
#include <iterator>
#include <limits>
#include <numeric>

#include "native_error.hpp"

namespace tierrt {

namespace {

std::string tier_label(const std::string& name) { return name.empty() ? "allocator" : "tier '" + name + "'"; }

bool is_power_of_two(uint64_t x) { return x != 0 && (x & (x - 1)) == 0; }

// Largest capacity accepted: leaves room for rounding and end-offset arithmetic without overflow.
constexpr uint64_t kMaxCapacity = uint64_t{1} << 62;

}  // namespace

Allocator::Allocator(uint64_t capacity, uint64_t alignment, std::string name)
    : capacity_(capacity), alignment_(alignment), name_(std::move(name)) {
  if (!is_power_of_two(alignment)) {
    throw NativeError("ConfigError", tier_label(name_) + ": alignment must be a power of two, got " +
                                         std::to_string(alignment))
        .with("alignment", static_cast<int64_t>(alignment));
  }
  if (capacity == 0 || capacity > kMaxCapacity) {
    throw NativeError("ConfigError", tier_label(name_) + ": capacity must be between 1 byte and " +
                                         format_size(kMaxCapacity) + ", got " + std::to_string(capacity) +
                                         " bytes")
        .with("capacity", static_cast<int64_t>(capacity));
  }
  by_size_.emplace(capacity_, 0);
  by_offset_.emplace(0, capacity_);
}

bool Allocator::alloc_locked(uint64_t rounded, uint64_t* offset, bool from_top) {
  // Best fit: the smallest extent whose size >= rounded; among equal sizes the lowest offset.
  auto it = by_size_.lower_bound({rounded, 0});
  if (it == by_size_.end()) return false;
  if (from_top) {
    // Same size class, highest offset; the block comes from the extent's back end.
    auto last = std::prev(by_size_.upper_bound({it->first, std::numeric_limits<uint64_t>::max()}));
    it = last;
    const uint64_t extent_size = it->first;
    const uint64_t extent_offset = it->second;
    const uint64_t end = extent_offset + extent_size;
    // Aligned down; the extent's offset is aligned and its size >= rounded, so start >= its offset.
    const uint64_t start = (end - rounded) & ~(alignment_ - 1);
    const uint64_t tail = end - (start + rounded);  // < alignment: only at an unaligned capacity end
    by_size_.erase(it);
    by_offset_.erase(extent_offset);
    if (start > extent_offset) {
      by_offset_.emplace(extent_offset, start - extent_offset);
      by_size_.emplace(start - extent_offset, extent_offset);
    }
    if (tail > 0) {
      by_offset_.emplace(start + rounded, tail);
      by_size_.emplace(tail, start + rounded);
    }
    live_.emplace(start, rounded);
    in_use_ += rounded;
    peak_in_use_ = std::max(peak_in_use_, in_use_);
    high_water_ = std::max(high_water_, start + rounded);
    ++total_allocs_;
    *offset = start;
    return true;
  }
  const uint64_t extent_size = it->first;
  const uint64_t extent_offset = it->second;
  auto oit = by_offset_.find(extent_offset);
  if (extent_size == rounded) {
    by_size_.erase(it);
    by_offset_.erase(oit);
  } else {
    // Carve from the front; the remainder keeps its place in offset order, so reuse both nodes.
    auto size_node = by_size_.extract(it);
    size_node.value() = {extent_size - rounded, extent_offset + rounded};
    by_size_.insert(std::move(size_node));
    auto hint = std::next(oit);
    auto offset_node = by_offset_.extract(oit);
    offset_node.key() = extent_offset + rounded;
    offset_node.mapped() = extent_size - rounded;
    by_offset_.insert(hint, std::move(offset_node));
  }
  live_.emplace(extent_offset, rounded);
  in_use_ += rounded;
  peak_in_use_ = std::max(peak_in_use_, in_use_);
  high_water_ = std::max(high_water_, extent_offset + rounded);
  ++total_allocs_;
  *offset = extent_offset;
  return true;
}

void Allocator::throw_capacity(uint64_t nbytes) const {
  uint64_t free_bytes, largest, extents;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    free_bytes = capacity_ - in_use_;
    largest = by_size_.empty() ? 0 : by_size_.rbegin()->first;
    extents = by_size_.size();
  }
  std::string message = tier_label(name_) + ": cannot allocate " + format_size(nbytes) + " (" +
                        std::to_string(nbytes) + " bytes): " + format_size(free_bytes) + " free in " +
                        std::to_string(extents) + (extents == 1 ? " extent" : " extents") +
                        ", the largest free extent is " + format_size(largest) + " (budget " +
                        format_size(capacity_) + ")";
  throw NativeError("TierCapacityError", message)
      .with("tier", name_)
      .with("requested", static_cast<int64_t>(nbytes))
      .with("free", static_cast<int64_t>(free_bytes))
      .with("largest_free", static_cast<int64_t>(largest))
      .with("budget", static_cast<int64_t>(capacity_));
}

std::optional<uint64_t> Allocator::try_alloc(uint64_t nbytes, bool from_top) {
  if (nbytes == 0) {
    throw NativeError("ConfigError", tier_label(name_) + ": cannot allocate 0 bytes").with("requested", 0);
  }
  if (nbytes > capacity_) return std::nullopt;
  const uint64_t rounded = round_up(nbytes);
  uint64_t offset = 0;
  std::lock_guard<std::mutex> lock(mutex_);
  if (!alloc_locked(rounded, &offset, from_top)) return std::nullopt;
  return offset;
}

uint64_t Allocator::alloc(uint64_t nbytes, bool from_top) {
  auto offset = try_alloc(nbytes, from_top);
  if (!offset) throw_capacity(nbytes);
  return *offset;
}

bool Allocator::free_noexcept(uint64_t offset) noexcept {
  std::lock_guard<std::mutex> lock(mutex_);
  auto lit = live_.find(offset);
  if (lit == live_.end()) return false;
  uint64_t start = offset;
  uint64_t length = lit->second;
  live_.erase(lit);
  in_use_ -= length;
  ++total_frees_;

  // Merge with the free extent right after, then with the one right before.
  auto next = by_offset_.lower_bound(offset);
  if (next != by_offset_.end() && next->first == start + length) {
    by_size_.erase({next->second, next->first});
    length += next->second;
    next = by_offset_.erase(next);
  }
  if (next != by_offset_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == start) {
      by_size_.erase({prev->second, prev->first});
      start = prev->first;
      length += prev->second;
      by_offset_.erase(prev);
    }
  }
  by_offset_.emplace_hint(next, start, length);
  by_size_.emplace(length, start);
  return true;
}

void Allocator::free(uint64_t offset) {
  if (!free_noexcept(offset)) {
    throw NativeError("ConfigError", tier_label(name_) + ": free of offset " + std::to_string(offset) +
                                         ", where no live allocation starts (double free, or an offset "
                                         "that this allocator did not hand out)")
        .with("tier", name_)
        .with("offset", static_cast<int64_t>(offset));
  }
}

uint64_t Allocator::size_of(uint64_t offset) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = live_.find(offset);
  if (it == live_.end()) {
    throw NativeError("ConfigError", tier_label(name_) + ": no live allocation starts at offset " +
                                         std::to_string(offset))
        .with("tier", name_)
        .with("offset", static_cast<int64_t>(offset));
  }
  return it->second;
}

uint64_t Allocator::current_end_locked() const {
  if (live_.empty()) return 0;
  // The highest free extent either reaches the end of the range (then live data ends where it
  // starts) or not (then something live ends at the capacity).
  if (!by_offset_.empty()) {
    auto last = std::prev(by_offset_.end());
    if (last->first + last->second == capacity_) return last->first;
  }
  return capacity_;
}

AllocatorStats Allocator::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  AllocatorStats s;
  s.capacity = capacity_;
  s.alignment = alignment_;
  s.in_use = in_use_;
  s.peak_in_use = peak_in_use_;
  s.high_water = high_water_;
  s.free = capacity_ - in_use_;
  s.largest_free = by_size_.empty() ? 0 : by_size_.rbegin()->first;
  s.free_extents = by_size_.size();
  s.fragmentation =
      s.free == 0 ? 0.0 : 1.0 - static_cast<double>(s.largest_free) / static_cast<double>(s.free);
  s.allocations = live_.size();
  s.total_allocs = total_allocs_;
  s.total_frees = total_frees_;
  return s;
}

void Allocator::reset_peak() {
  std::lock_guard<std::mutex> lock(mutex_);
  peak_in_use_ = in_use_;
  high_water_ = current_end_locked();
}

std::vector<std::pair<uint64_t, uint64_t>> Allocator::free_extents() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return {by_offset_.begin(), by_offset_.end()};
}

std::vector<std::pair<uint64_t, uint64_t>> Allocator::live_allocations() const {
  std::vector<std::pair<uint64_t, uint64_t>> out;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    out.assign(live_.begin(), live_.end());
  }
  std::sort(out.begin(), out.end());
  return out;
}

// ---------------------------------------------------------------------------------------------
// Static planning.

namespace {

struct PlanInput {
  const std::vector<uint64_t>& sizes;  // rounded
  const std::vector<int64_t>& first;
  const std::vector<int64_t>& last;
};

// Places buffers in `order`: each goes into the gap between already placed, time-overlapping
// buffers that fits it best (or the lowest such gap with first_fit), or on top of them.
uint64_t place_in_order(const PlanInput& in, const std::vector<size_t>& order, bool first_fit,
                        std::vector<uint64_t>& offsets) {
  std::vector<size_t> placed;
  placed.reserve(order.size());
  std::vector<std::pair<uint64_t, uint64_t>> busy;  // (offset, end) of conflicting buffers
  uint64_t peak = 0;
  for (size_t idx : order) {
    const uint64_t size = in.sizes[idx];
    if (size == 0) {
      offsets[idx] = 0;
      continue;
    }
    busy.clear();
    for (size_t p : placed) {
      if (in.first[p] <= in.last[idx] && in.first[idx] <= in.last[p]) {
        busy.emplace_back(offsets[p], offsets[p] + in.sizes[p]);
      }
    }
    std::sort(busy.begin(), busy.end());
    uint64_t cursor = 0;
    uint64_t best_offset = std::numeric_limits<uint64_t>::max();
    uint64_t best_gap = std::numeric_limits<uint64_t>::max();
    for (const auto& [begin, end] : busy) {
      if (begin > cursor) {
        const uint64_t gap = begin - cursor;
        if (gap >= size && gap < best_gap) {
          best_gap = gap;
          best_offset = cursor;
          if (first_fit) break;
        }
      }
      cursor = std::max(cursor, end);
    }
    if (best_offset == std::numeric_limits<uint64_t>::max()) best_offset = cursor;
    offsets[idx] = best_offset;
    peak = std::max(peak, best_offset + size);
    placed.push_back(idx);
  }
  return peak;
}

}  // namespace

std::pair<std::vector<uint64_t>, uint64_t> plan_static(const std::vector<uint64_t>& sizes,
                                                        const std::vector<int64_t>& first_use,
                                                        const std::vector<int64_t>& last_use,
                                                        uint64_t alignment) {
  if (!is_power_of_two(alignment)) {
    throw NativeError("ConfigError", "plan_static: alignment must be a power of two, got " +
                                         std::to_string(alignment));
  }
  const size_t n = sizes.size();
  if (first_use.size() != n || last_use.size() != n) {
    throw NativeError("ConfigError", "plan_static: sizes, first_use and last_use must have the same length, got " +
                                         std::to_string(n) + ", " + std::to_string(first_use.size()) + " and " +
                                         std::to_string(last_use.size()));
  }
  std::vector<uint64_t> rounded(n);
  for (size_t i = 0; i < n; ++i) {
    if (first_use[i] > last_use[i]) {
      throw NativeError("ConfigError", "plan_static: buffer " + std::to_string(i) + " has first_use " +
                                           std::to_string(first_use[i]) + " after its last_use " +
                                           std::to_string(last_use[i]))
          .with("index", static_cast<int64_t>(i));
    }
    if (sizes[i] > kMaxCapacity) {
      throw NativeError("ConfigError", "plan_static: buffer " + std::to_string(i) + " is too large (" +
                                           std::to_string(sizes[i]) + " bytes)")
          .with("index", static_cast<int64_t>(i));
    }
    rounded[i] = (sizes[i] + alignment - 1) & ~(alignment - 1);
  }
  PlanInput in{rounded, first_use, last_use};

  std::vector<size_t> base(n);
  std::iota(base.begin(), base.end(), 0);
  auto duration = [&](size_t i) { return static_cast<uint64_t>(last_use[i] - first_use[i]) + 1; };

  std::vector<std::vector<size_t>> orders;
  {  // largest first (ties: earliest first): the classic greedy-by-size order
    auto order = base;
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
      if (rounded[a] != rounded[b]) return rounded[a] > rounded[b];
      return first_use[a] < first_use[b];
    });
    orders.push_back(std::move(order));
  }
  {  // in time order: optimal when all sizes are equal (interval colouring)
    auto order = base;
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
      if (first_use[a] != first_use[b]) return first_use[a] < first_use[b];
      return rounded[a] > rounded[b];
    });
    orders.push_back(std::move(order));
  }
  if (n <= 4096) {
    {  // longest-lived first
      auto order = base;
      std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
        if (duration(a) != duration(b)) return duration(a) > duration(b);
        return rounded[a] > rounded[b];
      });
      orders.push_back(std::move(order));
    }
    {  // largest area (size x lifetime) first
      auto order = base;
      std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
        const long double area_a = static_cast<long double>(rounded[a]) * duration(a);
        const long double area_b = static_cast<long double>(rounded[b]) * duration(b);
        if (area_a != area_b) return area_a > area_b;
        return first_use[a] < first_use[b];
      });
      orders.push_back(std::move(order));
    }
  }

  std::vector<uint64_t> best_offsets(n, 0), offsets(n, 0);
  uint64_t best_peak = std::numeric_limits<uint64_t>::max();
  for (const auto& order : orders) {
    for (bool first_fit : {false, true}) {
      const uint64_t peak = place_in_order(in, order, first_fit, offsets);
      if (peak < best_peak) {
        best_peak = peak;
        best_offsets = offsets;
      }
    }
  }
  if (n == 0) best_peak = 0;
  return {std::move(best_offsets), best_peak};
}

}  // namespace tierrt
