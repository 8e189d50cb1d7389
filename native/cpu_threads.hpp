// A small persistent thread pool for the CPU kernels.
//
// run(threads, parts, task) calls task(0..parts-1) on up to `threads` threads: the calling thread and
// threads - 1 pool workers (created on first need, kept for the life of the process) claim parts
// one at a time until none is left, so a thread that the OS preempts (other work on the same cores)
// holds back at most the part it is in; the others take the rest.
// Workers are parked on a condition variable between calls, so an idle pool costs nothing. The
// caller's floating-point control word (MXCSR: rounding mode, flush-to-zero, denormals-are-zero) is
// applied in every worker for the duration of the call, so a step computes the same bits on every
// thread. When another thread is already using the pool (two Python threads calling kernels with the
// GIL released), the second caller runs its parts itself, one after the other. A forked child gets
// a fresh pool.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace tierrt::cpu {

// CPUs this process may run on (its affinity mask), at least 1.
int available_cpus();

class ThreadPool {
 public:
  static ThreadPool& instance();
  static constexpr int kMaxThreads = 1024;

  void run(int threads, int parts, const std::function<void(int)>& task);

  int workers() const { return static_cast<int>(workers_.size()); }

 private:
  ThreadPool() = default;
  void ensure_workers(int count);
  void worker_loop();
  bool claim(uint64_t generation, int parts, int* part);

  std::mutex run_mutex_;  // held by the caller of run() for the whole call
  std::mutex mutex_;      // guards the fields below and the condition variables
  std::condition_variable wake_;
  std::condition_variable done_;
  std::vector<std::thread> workers_;
  uint64_t generation_ = 0;
  const std::function<void(int)>* task_ = nullptr;
  int parts_ = 0;
  uint32_t mxcsr_ = 0;
  // (generation << 32) | next unclaimed part: a worker that wakes late for a finished call cannot
  // claim a part of the next one by mistake.
  std::atomic<uint64_t> next_{0};
  std::atomic<int> remaining_{0};
};

}  // namespace tierrt::cpu
