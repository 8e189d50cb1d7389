#include "cpu_threads.hpp"

#include <sched.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define TIERRT_HAVE_MXCSR 1
#endif

namespace tierrt::cpu {

namespace {

uint32_t read_fp_control() {
#ifdef TIERRT_HAVE_MXCSR
  return _mm_getcsr();
#else
  return 0;
#endif
}

void write_fp_control(uint32_t value) {
#ifdef TIERRT_HAVE_MXCSR
  if (_mm_getcsr() != value) _mm_setcsr(value);
#else
  (void)value;
#endif
}

}  // namespace

int available_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int count = CPU_COUNT(&set);
    if (count > 0) return count;
  }
  const long online = sysconf(_SC_NPROCESSORS_ONLN);
  return online > 0 ? static_cast<int>(online) : 1;
}

ThreadPool& ThreadPool::instance() {
  // Never destroyed: workers stay parked until the process exits (joining them from a static
  // destructor at interpreter shutdown can deadlock). A forked child builds its own pool, since the
  // parent's workers do not exist in it.
  static std::atomic<ThreadPool*> pool{nullptr};
  static std::atomic<pid_t> owner{0};
  static std::mutex create_mutex;
  const pid_t pid = getpid();
  ThreadPool* current = pool.load(std::memory_order_acquire);
  if (current != nullptr && owner.load(std::memory_order_acquire) == pid) return *current;
  std::lock_guard<std::mutex> lock(create_mutex);
  current = pool.load(std::memory_order_acquire);
  if (current == nullptr || owner.load(std::memory_order_acquire) != pid) {
    current = new ThreadPool();  // the parent's pool (if any) is abandoned in the child
    owner.store(pid, std::memory_order_release);
    pool.store(current, std::memory_order_release);
  }
  return *current;
}

void ThreadPool::ensure_workers(int count) {
  while (static_cast<int>(workers_.size()) < count) {
    workers_.emplace_back([this] { worker_loop(); });
  }
}

bool ThreadPool::claim(uint64_t generation, int parts, int* part) {
  uint64_t state = next_.load(std::memory_order_acquire);
  while (true) {
    if ((state >> 32) != (generation & 0xFFFFFFFFu)) return false;
    const int index = static_cast<int>(state & 0xFFFFFFFFu);
    if (index >= parts) return false;
    if (next_.compare_exchange_weak(state, state + 1, std::memory_order_acq_rel)) {
      *part = index;
      return true;
    }
  }
}

void ThreadPool::worker_loop() {
  uint64_t seen = 0;
  while (true) {
    const std::function<void(int)>* task;
    int parts;
    uint32_t mxcsr;
    uint64_t generation;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation = generation_;
      task = task_;
      parts = parts_;
      mxcsr = mxcsr_;
    }
    write_fp_control(mxcsr);
    int part;
    while (claim(generation, parts, &part)) {
      (*task)(part);
      if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(mutex_);
        done_.notify_all();
      }
    }
  }
}

void ThreadPool::run(int threads, int parts, const std::function<void(int)>& task) {
  if (parts <= 0) return;
  if (threads <= 1 || parts == 1) {
    for (int part = 0; part < parts; ++part) task(part);
    return;
  }
  std::unique_lock<std::mutex> busy(run_mutex_, std::try_to_lock);
  if (!busy.owns_lock()) {
    for (int part = 0; part < parts; ++part) task(part);
    return;
  }
  if (threads > kMaxThreads) threads = kMaxThreads;  // callers already cap; a guard, not a policy
  if (threads > parts) threads = parts;
  ensure_workers(threads - 1);
  uint64_t generation;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    generation = ++generation_;
    task_ = &task;
    parts_ = parts;
    mxcsr_ = read_fp_control();
    remaining_.store(parts, std::memory_order_release);
    next_.store((generation & 0xFFFFFFFFu) << 32, std::memory_order_release);
  }
  if (threads - 1 >= static_cast<int>(workers_.size())) {
    wake_.notify_all();
  } else {
    for (int w = 0; w < threads - 1; ++w) wake_.notify_one();
  }
  int part;
  while (claim(generation, parts, &part)) {
    task(part);
    remaining_.fetch_sub(1, std::memory_order_acq_rel);
  }
  std::unique_lock<std::mutex> lock(mutex_);
  done_.wait(lock, [&] { return remaining_.load(std::memory_order_acquire) == 0; });
}

}  // namespace tierrt::cpu
