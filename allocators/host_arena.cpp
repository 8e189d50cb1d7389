// HostArena: mmap, NUMA binding through raw syscalls (no libnuma), THP advice, parallel population,
// mlock, optional CUDA registration through a run-time loaded libcudart.
#include "host_arena.hpp"

#include <dlfcn.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <thread>

#include "native_error.hpp"

namespace tierrt {

namespace {

// Linux memory-policy ABI (include/uapi/linux/mempolicy.h), spelled out so that no libnuma header is
// needed and newer modes are known even with older kernel headers.
constexpr int kMpolDefault = 0;
constexpr int kMpolPreferred = 1;
constexpr int kMpolBind = 2;
constexpr int kMpolInterleave = 3;
constexpr int kMpolLocal = 4;
constexpr int kMpolPreferredMany = 5;
constexpr int kMpolWeightedInterleave = 6;
constexpr int kMpolModeFlags = (1 << 15) | (1 << 14) | (1 << 13);  // STATIC/RELATIVE_NODES, NUMA_BALANCING
constexpr unsigned long kMpolFAddr = 1UL << 1;
constexpr unsigned kMpolMfStrict = 1U << 0;
constexpr int kMaxNodes = 1024;  // bits in our node masks
constexpr int kMadvPopulateWrite = 23;
constexpr unsigned kMlockOnfault = 1U;
constexpr uint64_t kHugePage = 2ULL << 20;

using NodeMask = std::vector<unsigned long>;

NodeMask make_mask(const std::vector<int>& nodes) {
  NodeMask mask(kMaxNodes / (8 * sizeof(unsigned long)) + 1, 0);
  for (int n : nodes) mask[n / (8 * sizeof(unsigned long))] |= 1UL << (n % (8 * sizeof(unsigned long)));
  return mask;
}

std::vector<int> mask_nodes(const NodeMask& mask) {
  std::vector<int> nodes;
  for (int n = 0; n < kMaxNodes; ++n) {
    if (mask[n / (8 * sizeof(unsigned long))] & (1UL << (n % (8 * sizeof(unsigned long))))) nodes.push_back(n);
  }
  return nodes;
}

long sys_mbind(void* addr, unsigned long len, int mode, const NodeMask& mask, unsigned flags) {
  // The kernel reads maxnode - 1 bits (a historical off-by-one that libnuma also compensates).
  return syscall(SYS_mbind, addr, len, mode, mask.data(), static_cast<unsigned long>(kMaxNodes + 1), flags);
}

std::string errno_text(int err) { return std::string(std::strerror(err)) + " (errno " + std::to_string(err) + ")"; }

std::string tier_label(const std::string& name) { return "tier '" + name + "'"; }

std::string join(const std::vector<int>& values) {
  std::string out;
  for (size_t i = 0; i < values.size(); ++i) out += (i ? "," : "") + std::to_string(values[i]);
  return out.empty() ? "none" : out;
}

// Parses a kernel list such as "0-3,8,10-11".
std::vector<int> parse_list(const std::string& text) {
  std::vector<int> out;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) {
    item.erase(std::remove_if(item.begin(), item.end(), [](char c) { return std::isspace(static_cast<unsigned char>(c)); }),
               item.end());
    if (item.empty()) continue;
    const auto dash = item.find('-');
    try {
      if (dash == std::string::npos) {
        out.push_back(std::stoi(item));
      } else {
        const int lo = std::stoi(item.substr(0, dash));
        const int hi = std::stoi(item.substr(dash + 1));
        for (int n = lo; n <= hi; ++n) out.push_back(n);
      }
    } catch (const std::exception&) {
    }
  }
  return out;
}

bool read_first_line(const std::string& path, std::string* line) {
  std::ifstream in(path);
  if (!in) return false;
  std::getline(in, *line);
  return true;
}

std::vector<int> mems_allowed() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("Mems_allowed_list:", 0) == 0) return parse_list(line.substr(18));
  }
  return {};
}

bool path_exists(const std::string& path) { return access(path.c_str(), F_OK) == 0; }

// Value in bytes of "Key: N kB" in a meminfo-style file, or -1.
int64_t meminfo_value(const std::string& path, const std::string& key) {
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    const auto pos = line.find(key + ":");
    if (pos == std::string::npos) continue;
    std::stringstream rest(line.substr(pos + key.size() + 1));
    int64_t value = -1;
    std::string unit;
    rest >> value >> unit;
    return unit == "kB" ? value * 1024 : value;
  }
  return -1;
}

int64_t read_int_file(const std::string& path) {
  std::string line;
  if (!read_first_line(path, &line)) return -1;
  try {
    return std::stoll(line);
  } catch (const std::exception&) {
    return -1;  // "max" and the like
  }
}

int64_t stat_value(const std::string& path, const std::string& key) {
  std::ifstream in(path);
  std::string k;
  int64_t v;
  while (in >> k >> v) {
    if (k == key) return v;
  }
  return -1;
}

// Host memory this process could still fill: MemAvailable, lowered by a cgroup memory limit.
// Returns -1 when unknown. `source` names where the figure came from.
int64_t available_memory(std::string* source) {
  int64_t best = meminfo_value("/proc/meminfo", "MemAvailable");
  *source = "MemAvailable in /proc/meminfo";
  struct Limit {
    const char* max;
    const char* usage;
    const char* stat;
    const char* cache_key;
  };
  const Limit limits[] = {
      {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat", "file"},
      {"/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
       "/sys/fs/cgroup/memory/memory.stat", "total_cache"},
  };
  for (const auto& limit : limits) {
    const int64_t max = read_int_file(limit.max);
    const int64_t usage = read_int_file(limit.usage);
    if (max <= 0 || usage < 0 || max >= (int64_t{1} << 60)) continue;
    const int64_t cache = std::max<int64_t>(0, stat_value(limit.stat, limit.cache_key));
    const int64_t room = max - std::max<int64_t>(0, usage - cache);
    if (best < 0 || room < best) {
      best = std::max<int64_t>(0, room);
      *source = std::string("the memory cgroup limit (") + limit.max + ")";
    }
  }
  return best;
}

int usable_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

const char* mode_name(int mode) {
  switch (mode) {
    case kMpolDefault:
      return "default";
    case kMpolPreferred:
      return "preferred";
    case kMpolBind:
      return "bind";
    case kMpolInterleave:
      return "interleave";
    case kMpolLocal:
      return "local";
    case kMpolPreferredMany:
      return "preferred_many";
    case kMpolWeightedInterleave:
      return "weighted_interleave";
    default:
      return "unknown";
  }
}

}  // namespace

std::vector<int> numa_existing_nodes() {
  std::string line;
  if (read_first_line("/sys/devices/system/node/possible", &line)) {
    std::vector<int> nodes;
    for (int n : parse_list(line)) {
      if (path_exists("/sys/devices/system/node/node" + std::to_string(n))) nodes.push_back(n);
    }
    if (!nodes.empty()) return nodes;
  }
  return {0};
}

std::vector<int> numa_memory_nodes() {
  std::vector<int> with_memory;
  std::string line;
  if (read_first_line("/sys/devices/system/node/has_memory", &line)) {
    with_memory = parse_list(line);
  } else {
    with_memory = numa_existing_nodes();
  }
  const auto allowed = mems_allowed();
  if (allowed.empty()) return with_memory;
  std::vector<int> out;
  for (int n : with_memory) {
    if (std::find(allowed.begin(), allowed.end(), n) != allowed.end()) out.push_back(n);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------

HostArena::HostArena(const HostArenaOptions& options)
    : options_(options), allocator_(options.nbytes, options.alignment, options.name) {}

std::shared_ptr<HostArena> HostArena::create(const HostArenaOptions& in) {
  const auto start = std::chrono::steady_clock::now();
  HostArenaOptions options = in;
  const std::string label = tier_label(options.name);
  static const std::set<std::string> policies = {"default", "bind", "interleave", "preferred", "weighted"};

  if (options.nbytes == 0) {
    throw NativeError("ConfigError", label + ": an arena needs a size above 0 bytes").with("tier", options.name);
  }
  if (options.alignment == 0 || (options.alignment & (options.alignment - 1)) != 0 ||
      options.alignment > kHugePage) {
    throw NativeError("ConfigError", label + ": alignment must be a power of two of at most 2MiB, got " +
                                         std::to_string(options.alignment))
        .with("tier", options.name);
  }
  if (!policies.count(options.policy)) {
    throw NativeError("ConfigError", label + ": unknown NUMA policy '" + options.policy +
                                         "' (use default, bind, interleave, preferred or weighted)")
        .with("tier", options.name);
  }
  if (options.policy == "default" && !options.nodes.empty()) {
    throw NativeError("ConfigError", label + ": NUMA nodes " + join(options.nodes) +
                                         " were given with policy 'default'; choose bind, interleave, "
                                         "preferred or weighted")
        .with("tier", options.name);
  }
  if (options.policy != "default" && options.nodes.empty()) {
    throw NativeError("ConfigError", label + ": NUMA policy '" + options.policy + "' needs at least one node")
        .with("tier", options.name);
  }
  if (options.policy != "weighted" && !options.weights.empty()) {
    throw NativeError("ConfigError", label + ": weights are only used by policy 'weighted', not '" +
                                         options.policy + "'")
        .with("tier", options.name);
  }
  if (options.policy == "weighted") {
    if (options.weights.size() != options.nodes.size()) {
      throw NativeError("ConfigError", label + ": policy 'weighted' needs one weight per node, got " +
                                           std::to_string(options.weights.size()) + " weights for " +
                                           std::to_string(options.nodes.size()) + " nodes")
          .with("tier", options.name);
    }
    for (double w : options.weights) {
      if (!(w > 0) || !std::isfinite(w)) {
        throw NativeError("ConfigError", label + ": weights must be positive finite numbers")
            .with("tier", options.name);
      }
    }
  }
  if (!options.nodes.empty()) {
    const auto existing = numa_existing_nodes();
    const auto usable = numa_memory_nodes();
    std::vector<int> missing, unusable;
    std::set<int> seen;
    for (int n : options.nodes) {
      if (!seen.insert(n).second) {
        throw NativeError("ConfigError", label + ": NUMA node " + std::to_string(n) + " is listed twice")
            .with("tier", options.name);
      }
      if (n < 0 || n >= kMaxNodes || std::find(existing.begin(), existing.end(), n) == existing.end()) {
        missing.push_back(n);
      } else if (std::find(usable.begin(), usable.end(), n) == usable.end()) {
        unusable.push_back(n);
      }
    }
    if (!missing.empty()) {
      throw NativeError("ConfigError", label + ": NUMA node(s) " + join(missing) +
                                           " do not exist on this machine; its nodes are " + join(existing) +
                                           " (with memory usable by this process: " + join(usable) + ")")
          .with("tier", options.name)
          .with("nodes", join(existing));
    }
    if (!unusable.empty()) {
      throw NativeError("ConfigError", label + ": NUMA node(s) " + join(unusable) +
                                           " have no memory or are not in this process's Mems_allowed; "
                                           "usable nodes are " + join(usable))
          .with("tier", options.name)
          .with("nodes", join(usable));
    }
  }
  if (options.populate) {
    std::string source;
    const int64_t available = available_memory(&source);
    if (available >= 0 && options.nbytes > static_cast<uint64_t>(available)) {
      throw NativeError("TierCapacityError",
                        label + ": cannot reserve " + format_size(options.nbytes) + " of host memory: only " +
                            format_size(static_cast<uint64_t>(available)) + " is available (" + source +
                            "); lower the tier's budget")
          .with("tier", options.name)
          .with("requested", static_cast<int64_t>(options.nbytes))
          .with("free", available)
          .with("budget", static_cast<int64_t>(options.nbytes));
    }
  }

  std::shared_ptr<HostArena> arena(new HostArena(options));
  arena->map_region();
  arena->apply_numa_policy();
  if (options.hugepages) arena->hugepages_ = madvise(arena->base_, arena->map_len_, MADV_HUGEPAGE) == 0;
  if (options.populate) arena->populate_region();
  if (options.lock) arena->lock_region();
  arena->create_seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return arena;
}

void HostArena::map_region() {
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  map_len_ = (options_.nbytes + page - 1) / page * page;
  // Over-map by one huge page and trim, so that the region starts on a 2MiB boundary: THP can back
  // all of it, and weighted ranges fall on huge-page boundaries.
  const uint64_t span = map_len_ + kHugePage;
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) {
    const int err = errno;
    throw NativeError("TierCapacityError", tier_label(options_.name) + ": cannot map " +
                                               format_size(options_.nbytes) + " of host memory: " +
                                               errno_text(err))
        .with("tier", options_.name)
        .with("requested", static_cast<int64_t>(options_.nbytes))
        .with("budget", static_cast<int64_t>(options_.nbytes))
        .with("errno", err);
  }
  const uint64_t raw_addr = reinterpret_cast<uint64_t>(raw);
  const uint64_t aligned = (raw_addr + kHugePage - 1) & ~(kHugePage - 1);
  if (aligned > raw_addr) munmap(raw, aligned - raw_addr);
  const uint64_t tail = raw_addr + span - (aligned + map_len_);
  if (tail > 0) munmap(reinterpret_cast<void*>(aligned + map_len_), tail);
  base_ = reinterpret_cast<uint8_t*>(aligned);
}

void HostArena::apply_numa_policy() {
  const std::string& policy = options_.policy;
  if (policy == "default") return;
  const auto& nodes = options_.nodes;
  auto fail = [&](int err, const std::string& what) {
    throw NativeError("ConfigError", tier_label(options_.name) + ": " + what + " failed: " + errno_text(err))
        .with("tier", options_.name)
        .with("errno", err);
  };
  if (policy == "weighted") {
    // Contiguous ranges, one per node, sized in proportion to the weights, on 2MiB boundaries.
    double total = 0;
    for (double w : options_.weights) total += w;
    double cumulative = 0;
    uint64_t begin = 0;
    for (size_t i = 0; i < nodes.size(); ++i) {
      cumulative += options_.weights[i];
      uint64_t end = map_len_;
      if (i + 1 < nodes.size()) {
        const double exact = static_cast<double>(map_len_) * cumulative / total;
        end = std::min<uint64_t>(map_len_, static_cast<uint64_t>(std::llround(exact / kHugePage)) * kHugePage);
        end = std::max(end, begin);
      }
      if (end > begin) {
        if (sys_mbind(base_ + begin, end - begin, kMpolBind, make_mask({nodes[i]}), kMpolMfStrict) != 0) {
          fail(errno, "mbind of " + format_size(end - begin) + " to NUMA node " + std::to_string(nodes[i]));
        }
        ranges_.push_back({begin, end - begin, nodes[i]});
      }
      begin = end;
    }
    return;
  }
  int mode = kMpolBind;
  if (policy == "interleave") mode = kMpolInterleave;
  if (policy == "preferred") mode = nodes.size() == 1 ? kMpolPreferred : kMpolPreferredMany;
  if (sys_mbind(base_, map_len_, mode, make_mask(nodes), kMpolMfStrict) != 0) {
    const int err = errno;
    if (mode == kMpolPreferredMany && err == EINVAL) {
      fail(err, "mbind with policy 'preferred' over several nodes (" + join(nodes) +
                    ", MPOL_PREFERRED_MANY needs Linux 5.15)");
    }
    fail(err, "mbind with policy '" + policy + "' to NUMA node(s) " + join(nodes));
  }
  ranges_.push_back({0, map_len_, nodes.size() == 1 ? nodes[0] : -1});
}

void HostArena::populate_region() {
  // Fault every page in, so that the memory is really reserved now and never faults later. Each
  // thread takes 64MiB chunks (2MiB aligned) from a shared counter; MADV_POPULATE_WRITE (Linux
  // 5.14) faults without touching the data, writing one byte per page is the fallback.
  constexpr uint64_t kChunk = 64ULL << 20;
  const uint64_t chunks = (map_len_ + kChunk - 1) / kChunk;
  int threads = options_.populate_threads;
  if (threads <= 0) {
    threads = std::min<int>(16, usable_cpus());
    threads = static_cast<int>(std::min<uint64_t>(threads, std::max<uint64_t>(1, map_len_ / (256ULL << 20))));
  }
  threads = static_cast<int>(std::min<uint64_t>(threads, chunks));
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  std::atomic<uint64_t> next{0};
  std::atomic<int> first_error{0};
  std::atomic<bool> use_madvise{true};
  auto worker = [&]() {
    for (;;) {
      if (first_error.load(std::memory_order_relaxed) != 0) return;
      const uint64_t chunk = next.fetch_add(1);
      if (chunk >= chunks) return;
      uint8_t* begin = base_ + chunk * kChunk;
      const uint64_t len = std::min(kChunk, map_len_ - chunk * kChunk);
      if (use_madvise.load(std::memory_order_relaxed)) {
        if (madvise(begin, len, kMadvPopulateWrite) == 0) continue;
        const int err = errno;
        if (err != EINVAL) {
          int expected = 0;
          first_error.compare_exchange_strong(expected, err);
          return;
        }
        use_madvise.store(false);  // old kernel: touch instead
      }
      for (uint64_t off = 0; off < len; off += page) {
        reinterpret_cast<volatile uint8_t*>(begin)[off] = 0;
      }
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& th : pool) th.join();
  const int err = first_error.load();
  if (err != 0) {
    const std::string kind = (err == ENOMEM || err == EFAULT) ? "TierCapacityError" : "TierrtError";
    throw NativeError(kind, tier_label(options_.name) + ": populating " + format_size(options_.nbytes) +
                                " of host memory" +
                                (options_.policy == "default" ? "" : " on NUMA node(s) " + join(options_.nodes)) +
                                " failed: " + errno_text(err))
        .with("tier", options_.name)
        .with("requested", static_cast<int64_t>(options_.nbytes))
        .with("budget", static_cast<int64_t>(options_.nbytes))
        .with("errno", err);
  }
  populated_ = true;
}

void HostArena::lock_region() {
  // After population mlock only walks the page tables. Without population, lock on fault so that
  // locking does not populate the whole region on this one thread.
  long rc;
  if (populated_) {
    rc = mlock(base_, map_len_);
  } else {
    rc = syscall(SYS_mlock2, base_, map_len_, kMlockOnfault);
  }
  if (rc == 0) {
    locked_ = true;
    return;
  }
  const int err = errno;
  struct rlimit limit {};
  std::string limit_text = "unknown";
  if (getrlimit(RLIMIT_MEMLOCK, &limit) == 0) {
    limit_text = limit.rlim_cur == RLIM_INFINITY ? "unlimited" : format_size(limit.rlim_cur);
  }
  lock_error_ = "mlock of " + format_size(map_len_) + " failed: " + errno_text(err) + "; RLIMIT_MEMLOCK is " +
                limit_text + " (raise it with `ulimit -l` or grant CAP_IPC_LOCK); the arena stays usable "
                "but its pages may be swapped out";
}

HostArena::~HostArena() {
  cuda_unregister();
  if (base_ != nullptr) munmap(base_, map_len_);
}

void HostArena::check_range(uint64_t offset, uint64_t nbytes, const char* what) const {
  if (offset > options_.nbytes || nbytes > options_.nbytes - offset) {
    throw NativeError("ConfigError", tier_label(options_.name) + ": " + what + " [" + std::to_string(offset) +
                                         ", " + std::to_string(offset) + " + " + std::to_string(nbytes) +
                                         ") is outside the arena of " + std::to_string(options_.nbytes) +
                                         " bytes")
        .with("tier", options_.name)
        .with("offset", static_cast<int64_t>(offset))
        .with("nbytes", static_cast<int64_t>(nbytes));
  }
}

std::vector<int> HostArena::page_nodes(uint64_t offset, uint64_t nbytes, size_t max_pages) const {
  check_range(offset, nbytes, "page_nodes range");
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  const uint64_t first = offset / page;
  const uint64_t last = nbytes == 0 ? first : (offset + nbytes - 1) / page;
  const uint64_t total = nbytes == 0 ? 0 : last - first + 1;
  const uint64_t count = std::min<uint64_t>(total, max_pages);
  if (count == 0) return {};
  std::vector<void*> pages(count);
  for (uint64_t i = 0; i < count; ++i) {
    const uint64_t index = count == 1 ? first : first + i * (total - 1) / (count - 1);
    pages[i] = base_ + index * page;
  }
  std::vector<int> status(count, 0);
  if (syscall(SYS_move_pages, 0, count, pages.data(), nullptr, status.data(), 0) != 0) {
    const int err = errno;
    throw NativeError("TierrtError", tier_label(options_.name) + ": move_pages query failed: " + errno_text(err))
        .with("tier", options_.name)
        .with("errno", err);
  }
  return status;
}

std::pair<std::string, std::vector<int>> HostArena::policy_at(uint64_t offset) const {
  check_range(offset, 1, "policy_at offset");
  int mode = 0;
  NodeMask mask(kMaxNodes / (8 * sizeof(unsigned long)) + 1, 0);
  if (syscall(SYS_get_mempolicy, &mode, mask.data(), static_cast<unsigned long>(kMaxNodes + 1), base_ + offset,
              kMpolFAddr) != 0) {
    const int err = errno;
    throw NativeError("TierrtError", tier_label(options_.name) + ": get_mempolicy failed: " + errno_text(err))
        .with("tier", options_.name)
        .with("errno", err);
  }
  return {mode_name(mode & ~kMpolModeFlags), mask_nodes(mask)};
}

uint64_t HostArena::hugepage_bytes() const {
  std::ifstream in("/proc/self/smaps");
  const uint64_t lo = reinterpret_cast<uint64_t>(base_);
  const uint64_t hi = lo + map_len_;
  std::string line;
  bool inside = false;
  uint64_t total = 0;
  while (std::getline(in, line)) {
    if (!line.empty() && std::isxdigit(static_cast<unsigned char>(line[0])) && line.find('-') != std::string::npos &&
        line.find(':') > line.find(' ')) {
      // A mapping header: "start-end perms offset dev inode path".
      const auto dash = line.find('-');
      const auto space = line.find(' ');
      try {
        const uint64_t start = std::stoull(line.substr(0, dash), nullptr, 16);
        const uint64_t end = std::stoull(line.substr(dash + 1, space - dash - 1), nullptr, 16);
        inside = start < hi && end > lo;
      } catch (const std::exception&) {
        inside = false;
      }
      continue;
    }
    if (inside && line.rfind("AnonHugePages:", 0) == 0) {
      std::stringstream rest(line.substr(14));
      uint64_t kb = 0;
      rest >> kb;
      total += kb * 1024;
    }
  }
  return total;
}

bool HostArena::cuda_registered() const {
  std::lock_guard<std::mutex> lock(cuda_mutex_);
  return cuda_unregister_fn_ != nullptr;
}

void HostArena::cuda_register(const std::string& library) {
  std::lock_guard<std::mutex> lock(cuda_mutex_);
  if (cuda_unregister_fn_ != nullptr) return;
  std::vector<std::string> candidates;
  if (!library.empty()) {
    candidates.push_back(library);
  } else {
    candidates = {"libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"};
  }
  void* handle = nullptr;
  for (const auto& name : candidates) {  // prefer the copy already in the process (torch's)
    handle = dlopen(name.c_str(), RTLD_NOW | RTLD_NOLOAD);
    if (handle) break;
  }
  std::string dl_error;
  if (!handle) {
    for (const auto& name : candidates) {
      handle = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (handle) break;
      const char* e = dlerror();
      if (e) dl_error = e;
    }
  }
  if (!handle) {
    throw NativeError("TierrtError", tier_label(options_.name) + ": cannot load the CUDA runtime to pin the arena (" +
                                         (dl_error.empty() ? std::string("libcudart not found") : dl_error) + ")")
        .with("tier", options_.name);
  }
  using RegisterFn = int (*)(void*, size_t, unsigned);
  auto reg = reinterpret_cast<RegisterFn>(dlsym(handle, "cudaHostRegister"));
  auto unreg = reinterpret_cast<CudaUnregisterFn>(dlsym(handle, "cudaHostUnregister"));
  auto err_string = reinterpret_cast<CudaErrorStringFn>(dlsym(handle, "cudaGetErrorString"));
  if (!reg || !unreg) {
    throw NativeError("TierrtError", tier_label(options_.name) +
                                         ": the CUDA runtime library lacks cudaHostRegister/cudaHostUnregister")
        .with("tier", options_.name);
  }
  constexpr unsigned kCudaHostRegisterPortable = 1;
  const int rc = reg(base_, map_len_, kCudaHostRegisterPortable);
  if (rc != 0) {
    const std::string text = err_string ? err_string(rc) : "unknown error";
    throw NativeError("TierrtError", tier_label(options_.name) + ": cudaHostRegister of " + format_size(map_len_) +
                                         " failed: " + text + " (cudaError " + std::to_string(rc) + ")")
        .with("tier", options_.name)
        .with("cuda_error", rc);
  }
  cuda_error_string_fn_ = err_string;
  cuda_unregister_fn_ = unreg;
}

bool HostArena::cuda_unregister() {
  std::lock_guard<std::mutex> lock(cuda_mutex_);
  if (!cuda_unregister_fn_) return false;
  cuda_unregister_fn_(base_);
  cuda_unregister_fn_ = nullptr;
  return true;
}

}  // namespace tierrt
