// HostArena: one mmap'd region of host memory per tier, sized to the tier's budget.
//
// At creation the region is bound to NUMA node(s) with mbind (bind, interleave, preferred, or a
// weighted split into contiguous ranges each bound to one node), advised for transparent huge pages,
// populated (every page faulted in, in parallel, so that the budget is really reserved and later use
// never faults) and mlock'ed. It never grows: allocations come from an Allocator over the region and
// a request that does not fit raises TierCapacityError. Optionally the region is registered once with
// CUDA as pinned memory (libcudart is loaded at run time; nothing CUDA at build time).
//
// Ownership: a HostArena lives in a shared_ptr; every ArenaBuffer handed out holds one, so the region
// is unmapped only when the arena and every buffer are gone. An owning ArenaBuffer returns its range
// to the allocator when it is destroyed.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "allocator.hpp"

namespace tierrt {

struct HostArenaOptions {
  uint64_t nbytes = 0;
  std::vector<int> nodes;
  std::string policy = "default";  // default | bind | interleave | preferred | weighted
  std::vector<double> weights;     // weighted only: one per node
  bool hugepages = true;
  bool lock = true;
  bool populate = true;
  uint64_t alignment = 4096;
  std::string name = "dram";
  int populate_threads = 0;  // 0: one per usable CPU, at most 16, at least 256MiB each
};

// A contiguous range of the region and the node its pages are bound to (policy "weighted").
struct NodeRange {
  uint64_t offset;
  uint64_t nbytes;
  int node;
};

class HostArena {
 public:
  // Maps, binds, advises, populates and locks. Throws ConfigError (bad arguments, nodes),
  // TierCapacityError (mmap or population failed for lack of memory). Does not touch Python.
  static std::shared_ptr<HostArena> create(const HostArenaOptions& options);
  ~HostArena();

  HostArena(const HostArena&) = delete;
  HostArena& operator=(const HostArena&) = delete;

  uint8_t* base() const { return base_; }
  uint64_t nbytes() const { return options_.nbytes; }
  uint64_t mapped_bytes() const { return map_len_; }
  const std::string& name() const { return options_.name; }
  const std::string& policy() const { return options_.policy; }
  const std::vector<int>& nodes() const { return options_.nodes; }
  const std::vector<NodeRange>& node_ranges() const { return ranges_; }
  bool locked() const { return locked_; }
  const std::string& lock_error() const { return lock_error_; }
  bool hugepages() const { return hugepages_; }
  bool populated() const { return populated_; }
  double create_seconds() const { return create_seconds_; }
  Allocator& allocator() { return allocator_; }
  const Allocator& allocator() const { return allocator_; }

  // Checks that [offset, offset + nbytes) lies inside the region; ConfigError otherwise.
  void check_range(uint64_t offset, uint64_t nbytes, const char* what) const;

  // NUMA node of up to max_pages pages sampled evenly over [offset, offset + nbytes), from
  // move_pages(2) in query mode. A negative entry is -errno for that page (-ENOENT: not present).
  std::vector<int> page_nodes(uint64_t offset, uint64_t nbytes, size_t max_pages) const;
  // The kernel's memory policy for the page at offset: (mode name, nodes), from get_mempolicy(2).
  std::pair<std::string, std::vector<int>> policy_at(uint64_t offset) const;
  // Bytes of the region backed by transparent huge pages (AnonHugePages in /proc/self/smaps).
  uint64_t hugepage_bytes() const;

  // Registers the whole region with CUDA (cudaHostRegister, portable) through the libcudart at
  // `library` (a path or soname; empty: the one already loaded, else the usual sonames). Idempotent.
  // Throws TierrtError naming the CUDA error. Unregistration happens at the latest before munmap.
  void cuda_register(const std::string& library);
  // Returns false when the region was not registered.
  bool cuda_unregister();
  bool cuda_registered() const;

 private:
  explicit HostArena(const HostArenaOptions& options);
  void map_region();
  void apply_numa_policy();
  void populate_region();
  void lock_region();

  HostArenaOptions options_;
  Allocator allocator_;
  uint8_t* base_ = nullptr;
  uint64_t map_len_ = 0;
  std::vector<NodeRange> ranges_;
  bool locked_ = false;
  std::string lock_error_;
  bool hugepages_ = false;
  bool populated_ = false;
  double create_seconds_ = 0;
  using CudaUnregisterFn = int (*)(void*);
  using CudaErrorStringFn = const char* (*)(int);
  mutable std::mutex cuda_mutex_;
  CudaUnregisterFn cuda_unregister_fn_ = nullptr;
  CudaErrorStringFn cuda_error_string_fn_ = nullptr;
};

// A range of a HostArena. Owning buffers (from alloc) give their range back when destroyed;
// views (from buffer_at) only keep the arena alive.
class ArenaBuffer {
 public:
  ArenaBuffer(std::shared_ptr<HostArena> arena, uint64_t offset, uint64_t nbytes, bool owning)
      : arena_(std::move(arena)), offset_(offset), nbytes_(nbytes), owning_(owning) {}
  ~ArenaBuffer() {
    if (owning_) arena_->allocator().free_noexcept(offset_);
  }
  ArenaBuffer(const ArenaBuffer&) = delete;
  ArenaBuffer& operator=(const ArenaBuffer&) = delete;

  uint8_t* data() const { return arena_->base() + offset_; }
  uint64_t offset() const { return offset_; }
  uint64_t nbytes() const { return nbytes_; }
  bool owning() const { return owning_; }
  const std::shared_ptr<HostArena>& arena() const { return arena_; }

 private:
  std::shared_ptr<HostArena> arena_;
  uint64_t offset_;
  uint64_t nbytes_;
  bool owning_;
};

// Nodes with memory that this process may allocate on (has_memory and Mems_allowed).
std::vector<int> numa_memory_nodes();
// Nodes that exist on this machine (sysfs); {0} on a kernel without NUMA.
std::vector<int> numa_existing_nodes();

}  // namespace tierrt
