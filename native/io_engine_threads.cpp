// Thread-pool backend of the I/O engine: workers take chunks from one FIFO and run pread/pwrite
// (or fdatasync) on them. At most min(threads, queue_depth) chunks are in flight.
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <thread>

#include "io_engine.hpp"

namespace tierrt::io {

namespace {

constexpr uint16_t kMaxRetries = 10000;

class ThreadEngine final : public Engine {
 public:
  ThreadEngine(uint32_t queue_depth, uint32_t block_size, uint32_t threads, const std::string& name,
               const std::string& note)
      : Engine("threads", queue_depth, block_size, name) {
    backend_note_ = note;
    uint32_t n = threads ? threads : std::min<uint32_t>(queue_depth, 256);
    n = std::min(n, queue_depth);
    threads_ = n;
    workers_.reserve(n);
    for (uint32_t i = 0; i < n; ++i) {
      workers_.emplace_back([this, i] {
        char tname[16];
        snprintf(tname, sizeof(tname), "tierrt-io-%u", i);
        pthread_setname_np(pthread_self(), tname);
        worker();
      });
    }
  }

  ~ThreadEngine() override { close(); }

 protected:
  void enqueue(Chunk* head, Chunk* tail, size_t n) override {
    if (!queue_chunks(mu_, queue_, head, tail, n, [] {})) return;
    if (n == 1) {
      cv_.notify_one();
    } else {
      cv_.notify_all();
    }
  }

  void shutdown() override {
    close_queue(mu_, queue_);
    cv_.notify_all();
    for (auto& t : workers_) {
      if (t.joinable()) t.join();
    }
  }

 private:
  void worker() {
    for (;;) {
      Chunk* c;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return !queue_.empty() || queue_.closed(); });
        c = queue_.pop();
        if (!c) return;  // closed and drained
        set_pending(queue_.size());
        // Faults are armed in queue order (under the queue lock) so that "after N chunks" means the
        // same chunks on every run and on both backends.
        if (arm_fault(c)) continue;  // parked by a stall fault
      }
      chunk_started();
      ChunkError::Kind kind = ChunkError::Errno;
      int err = run(c, &kind);
      chunk_finished();
      complete(c, kind, err);  // c may be freed from here on
    }
  }

  static bool remainder_aligned(const Chunk* c) {
    const FileSet& fs = *c->req->fileset();
    return (c->file_off + c->done) % fs.offset_align == 0 && (c->limit - c->done) % fs.offset_align == 0 &&
           reinterpret_cast<uintptr_t>(c->buf + c->done) % fs.mem_align == 0;
  }

  // Runs one chunk to its end; returns the errno (0: success) and sets *kind.
  int run(Chunk* c, ChunkError::Kind* kind) {
    *kind = ChunkError::Errno;
    if (c->fault == FaultMode::Error) return c->fault_errno;
    if (c->op == Op::Sync) {
      for (;;) {
        if (fdatasync(c->file->fd_buffered) == 0) return 0;
        if (errno != EINTR) return errno;
      }
    }
    while (c->done < c->limit) {
      const size_t want = c->limit - c->done;
      const off_t off = static_cast<off_t>(c->file_off + c->done);
      ssize_t n = c->op == Op::Read ? pread(c->fd(), c->buf + c->done, want, off)
                                    : pwrite(c->fd(), c->buf + c->done, want, off);
      if (n < 0) {
        int err = errno;
        if ((err == EINTR || err == EAGAIN) && c->retries < kMaxRetries) {
          ++c->retries;
          note_retry();
          if (err == EAGAIN) sched_yield();
          continue;
        }
        if (err == EINVAL && c->direct) {  // the device refused this O_DIRECT transfer: go buffered
          c->direct = false;
          note_direct_fallback();
          continue;
        }
        return err;
      }
      if (n == 0) {
        *kind = c->op == Op::Read ? ChunkError::Eof : ChunkError::Short;
        return 0;
      }
      c->done += static_cast<uint32_t>(n);
      if (c->direct && c->done < c->limit && !remainder_aligned(c)) c->direct = false;
    }
    if (c->fault == FaultMode::Short) {
      *kind = ChunkError::Short;
      return 0;
    }
    if (c->fault == FaultMode::Torn) return c->fault_errno;
    return 0;
  }

  std::mutex mu_;
  std::condition_variable cv_;
  ChunkQueue queue_;  // guarded by mu_
  std::vector<std::thread> workers_;
};

}  // namespace

std::unique_ptr<Engine> make_thread_engine(uint32_t queue_depth, uint32_t block_size, uint32_t threads,
                                           const std::string& name, const std::string& note) {
  return std::make_unique<ThreadEngine>(queue_depth, block_size, threads, name, note);
}

}  // namespace tierrt::io
