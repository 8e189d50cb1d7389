// io_uring backend of the I/O engine (built when liburing is found).
//
// One ring, owned by one thread (the "ring thread") that does everything with it: it takes chunks
// from the pending FIFO while fewer than queue_depth are in flight, prepares one SQE per chunk,
// submits them all with one io_uring_enter that also waits for at least one completion, reaps the
// completion queue in a batch, resubmits the remainders of short transfers and EINTR/EAGAIN
// failures, and completes the chunks. Callers hand it work through the FIFO and wake it by writing
// an eventfd on which the ring always has a read pending; the write is skipped when the ring thread
// is not waiting for work (it then picks the new chunks up after its next completion).
//
// Because only the ring thread touches the ring, it is set up with IORING_SETUP_SINGLE_ISSUER and
// IORING_SETUP_DEFER_TASKRUN where the kernel has them (6.1+): completions are then processed in the
// ring thread's own io_uring_enter, without interrupting it.
//
// Registered buffers: register_buffers() pins memory regions (the host arena) into the ring, split
// into pieces of at most 1GiB (a kernel limit per buffer). A chunk whose memory lies inside one
// piece is sent as READ_FIXED / WRITE_FIXED, which saves the kernel pinning the pages of every
// transfer again (measured: a large gain for O_DIRECT reads here, see benchmarks/bench_io.py).
// (Re)registration is done by the ring thread itself when no chunk is in flight.
#ifdef TIERRT_HAVE_LIBURING

#include <liburing.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <thread>

#include "io_engine.hpp"

#ifndef IORING_SETUP_SINGLE_ISSUER
#define IORING_SETUP_SINGLE_ISSUER (1U << 12)
#endif
#ifndef IORING_SETUP_DEFER_TASKRUN
#define IORING_SETUP_DEFER_TASKRUN (1U << 13)
#endif

namespace tierrt::io {

namespace {

constexpr uint64_t kWakeTag = 1;  // user_data of the eventfd read (chunk pointers are aligned)
constexpr uint16_t kMaxRetries = 10000;
constexpr uint64_t kMaxFixedPiece = 1ull << 30;
constexpr size_t kMaxFixedBuffers = 16384;

std::string errno_text(int err) {
  char buf[256];
  const char* text = strerror_r(err, buf, sizeof(buf));
  return std::string(text) + " (errno " + std::to_string(err) + ")";
}

std::string uring_error_hint(int err) {
  switch (err) {
    case ENOSYS:
      return "the kernel has no io_uring";
    case EPERM:
      return "io_uring is disabled (sysctl kernel.io_uring_disabled, or a seccomp filter of the "
             "container)";
    case ENOMEM:
      return "not enough lockable memory for the ring (RLIMIT_MEMLOCK)";
    default:
      return "";
  }
}

struct Control {
  bool do_register = false;
  std::vector<Region> regions;
  int result = 0;
  size_t pieces = 0;
  bool finished = false;  // guarded by UringEngine::mu_
};

struct Fixed {
  uintptr_t base;
  uint64_t len;
  int index;
};

class UringEngine final : public Engine {
 public:
  UringEngine(uint32_t queue_depth, uint32_t block_size, const std::string& name)
      : Engine("io_uring", queue_depth, block_size, name) {
    threads_ = 1;
  }

  ~UringEngine() override {
    close();
    if (efd_ >= 0) ::close(efd_);
  }

  bool start(std::string* why) {
    efd_ = eventfd(0, EFD_CLOEXEC);
    if (efd_ < 0) {
      *why = "eventfd failed: " + errno_text(errno);
      return false;
    }
    thread_ = std::thread([this] { main(); });
    int r;
    {
      std::unique_lock<std::mutex> lk(mu_);
      ctl_cv_.wait(lk, [&] { return init_done_; });
      r = init_result_;
    }
    if (r < 0) {
      thread_.join();
      std::string hint = uring_error_hint(-r);
      *why = "io_uring_queue_init failed: " + errno_text(-r) + (hint.empty() ? "" : "; " + hint);
      return false;
    }
    return true;
  }

  size_t register_buffers(const std::vector<Region>& regions) override {
    std::vector<Region> sorted = regions;
    std::sort(sorted.begin(), sorted.end(), [](const Region& a, const Region& b) { return a.base < b.base; });
    size_t pieces = 0;
    for (size_t i = 0; i < sorted.size(); ++i) {
      if (sorted[i].len == 0 || sorted[i].base == 0) {
        throw NativeError("ConfigError", "register_buffers: empty or null region");
      }
      if (i > 0 && sorted[i - 1].base + sorted[i - 1].len > sorted[i].base) {
        throw NativeError("ConfigError", "register_buffers: regions overlap");
      }
      pieces += (sorted[i].len + kMaxFixedPiece - 1) / kMaxFixedPiece;
    }
    if (pieces > kMaxFixedBuffers) {
      throw NativeError("ConfigError", "register_buffers: the regions need " + std::to_string(pieces) +
                                           " ring buffers of at most 1GiB; io_uring allows " +
                                           std::to_string(kMaxFixedBuffers));
    }
    Control ctl;
    ctl.do_register = true;
    ctl.regions = std::move(sorted);
    run_control(&ctl);
    if (ctl.result < 0) {
      uint64_t total = 0;
      for (const auto& r : ctl.regions) total += r.len;
      std::string msg = "registering " + format_size(total) + " of memory as io_uring fixed buffers failed: " +
                        errno_text(-ctl.result);
      if (-ctl.result == ENOMEM || -ctl.result == EFAULT) {
        msg += " (the locked-memory limit RLIMIT_MEMLOCK is too low, or the memory is not pinnable)";
      }
      NativeError e("IOEngineError", msg);
      e.with("errno", static_cast<int64_t>(-ctl.result)).with("nbytes", static_cast<int64_t>(total));
      throw e;
    }
    return ctl.pieces;
  }

  void unregister_buffers() override {
    Control ctl;
    ctl.do_register = false;
    run_control(&ctl);
  }

 protected:
  void enqueue(Chunk* head, Chunk* tail, size_t n) override {
    bool wake = false;
    auto take_wake = [&] {
      wake = need_wake_;
      need_wake_ = false;
    };
    if (queue_chunks(mu_, queue_, head, tail, n, take_wake) && wake) wake_ring();
  }

  void shutdown() override {
    close_queue(mu_, queue_);
    if (thread_.joinable()) {
      wake_ring();
      thread_.join();
    }
    // The ring went with the thread; the eventfd that woke it goes now (a closed engine kept
    // referenced, e.g. by a runtime kept for its report, holds no descriptor).
    if (efd_ >= 0) {
      ::close(efd_);
      efd_ = -1;
    }
  }

 private:
  void wake_ring() {
    uint64_t one = 1;
    while (::write(efd_, &one, sizeof(one)) < 0 && errno == EINTR) {
    }
  }

  // Hands a control command to the ring thread and waits until it has run it.
  void run_control(Control* ctl) {
    {
      std::unique_lock<std::mutex> lk(mu_);
      ctl_cv_.wait(lk, [&] { return control_ == nullptr || queue_.closed(); });
      if (queue_.closed()) throw NativeError("ConfigError", "IOEngine '" + name_ + "' is closed");
      control_ = ctl;
      need_wake_ = false;
    }
    wake_ring();
    std::unique_lock<std::mutex> lk(mu_);
    ctl_cv_.wait(lk, [&] { return ctl->finished; });
  }

  // Ring thread: marks the control command done; *ctl must not be touched afterwards.
  void control_finished(Control* ctl) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      ctl->finished = true;
      control_ = nullptr;
    }
    ctl_cv_.notify_all();
  }

  // Runs in the ring thread with nothing in flight.
  void do_control(Control* ctl) {
    if (!fixed_.empty()) {
      io_uring_unregister_buffers(&ring_);
      fixed_.clear();
      registered_buffers_.store(0);
      registered_bytes_.store(0);
    }
    if (ctl->do_register && !ctl->regions.empty()) {
      std::vector<iovec> iov;
      std::vector<Fixed> fixed;
      uint64_t total = 0;
      for (const auto& r : ctl->regions) {
        for (uint64_t off = 0; off < r.len; off += kMaxFixedPiece) {
          uint64_t len = std::min(kMaxFixedPiece, r.len - off);
          iov.push_back({reinterpret_cast<void*>(r.base + off), static_cast<size_t>(len)});
          fixed.push_back({r.base + off, len, static_cast<int>(fixed.size())});
          total += len;
        }
      }
      int res = io_uring_register_buffers(&ring_, iov.data(), static_cast<unsigned>(iov.size()));
      if (res < 0) {
        ctl->result = res;
      } else {
        fixed_ = std::move(fixed);
        ctl->pieces = fixed_.size();
        registered_buffers_.store(fixed_.size());
        registered_bytes_.store(total);
      }
    }
    control_finished(ctl);
  }

  int find_fixed(const char* buf, uint64_t len) const {
    if (fixed_.empty()) return -1;
    uintptr_t a = reinterpret_cast<uintptr_t>(buf);
    auto it = std::upper_bound(fixed_.begin(), fixed_.end(), a,
                               [](uintptr_t v, const Fixed& f) { return v < f.base; });
    if (it == fixed_.begin()) return -1;
    --it;
    if (a >= it->base && a + len <= it->base + it->len) return it->index;
    return -1;
  }

  io_uring_sqe* get_sqe() {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    while (!sqe) {  // cannot happen with entries > queue_depth + 1, but never drop a chunk
      io_uring_submit(&ring_);
      sqe = io_uring_get_sqe(&ring_);
    }
    return sqe;
  }

  void arm_wake() {
    io_uring_sqe* sqe = get_sqe();
    io_uring_prep_read(sqe, efd_, &efd_value_, sizeof(efd_value_), 0);
    io_uring_sqe_set_data64(sqe, kWakeTag);
  }

  void prep(Chunk* c, bool async) {
    io_uring_sqe* sqe = get_sqe();
    if (c->op == Op::Sync) {
      io_uring_prep_fsync(sqe, c->file->fd_buffered, IORING_FSYNC_DATASYNC);
    } else {
      char* buf = c->buf + c->done;
      unsigned len = c->limit - c->done;
      uint64_t off = c->file_off + c->done;
      int idx = find_fixed(buf, len);
      if (idx >= 0) {
        if (c->done == 0 && c->retries == 0) note_fixed();
        if (c->op == Op::Read) {
          io_uring_prep_read_fixed(sqe, c->fd(), buf, len, off, idx);
        } else {
          io_uring_prep_write_fixed(sqe, c->fd(), buf, len, off, idx);
        }
      } else if (c->op == Op::Read) {
        io_uring_prep_read(sqe, c->fd(), buf, len, off);
      } else {
        io_uring_prep_write(sqe, c->fd(), buf, len, off);
      }
    }
    if (async) io_uring_sqe_set_flags(sqe, IOSQE_ASYNC);
    io_uring_sqe_set_data(sqe, c);
  }

  void finish(Chunk* c, ChunkError::Kind kind, int err) {
    --inflight_;
    chunk_finished();
    complete(c, kind, err);
  }

  void finish_transferred(Chunk* c) {
    if (c->fault == FaultMode::Short) {
      finish(c, ChunkError::Short, 0);
    } else if (c->fault == FaultMode::Torn) {
      finish(c, ChunkError::Errno, c->fault_errno);
    } else {
      finish(c, ChunkError::Errno, 0);
    }
  }

  void dispatch(Chunk* c) {
    if (arm_fault(c)) return;  // parked by a stall fault
    ++inflight_;
    chunk_started();
    if (c->fault == FaultMode::Error) {
      finish(c, ChunkError::Errno, c->fault_errno);
      return;
    }
    if (c->op != Op::Sync && c->limit == 0) {  // a short/torn fault on a 1-byte chunk
      finish_transferred(c);
      return;
    }
    prep(c, false);
  }

  bool remainder_aligned(const Chunk* c) const {
    const FileSet& fs = *c->req->fileset();
    return (c->file_off + c->done) % fs.offset_align == 0 && (c->limit - c->done) % fs.offset_align == 0 &&
           reinterpret_cast<uintptr_t>(c->buf + c->done) % fs.mem_align == 0;
  }

  void handle(uint64_t data, int res) {
    if (data == kWakeTag) {
      arm_wake();
      return;
    }
    Chunk* c = reinterpret_cast<Chunk*>(data);
    if (res < 0) {
      int err = -res;
      if ((err == EINTR || err == EAGAIN) && c->retries < kMaxRetries) {
        ++c->retries;
        note_retry();
        prep(c, true);
        return;
      }
      if (err == EINVAL && c->direct && c->op != Op::Sync) {
        c->direct = false;
        note_direct_fallback();
        prep(c, false);
        return;
      }
      finish(c, ChunkError::Errno, err);
      return;
    }
    if (c->op == Op::Sync) {
      finish(c, ChunkError::Errno, 0);
      return;
    }
    if (res == 0) {
      finish(c, c->op == Op::Read ? ChunkError::Eof : ChunkError::Short, 0);
      return;
    }
    c->done += static_cast<uint32_t>(res);
    if (c->done < c->limit) {  // short transfer: resubmit the rest
      if (c->direct && !remainder_aligned(c)) c->direct = false;
      prep(c, false);
      return;
    }
    finish_transferred(c);
  }

  int init_ring() {
    unsigned entries = queue_depth_ + 4;
    io_uring_params p;
    std::memset(&p, 0, sizeof(p));
    p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
    int r = io_uring_queue_init_params(entries, &ring_, &p);
    if (r == -EINVAL) {  // kernel older than 6.1
      std::memset(&p, 0, sizeof(p));
      r = io_uring_queue_init_params(entries, &ring_, &p);
    }
    if (r < 0) return r;
    cq_entries_ = p.cq_entries;
    io_uring_register_ring_fd(&ring_);  // an optimisation only; failure is harmless
    return 0;
  }

  void main() {
    pthread_setname_np(pthread_self(), "tierrt-uring");
    int r = init_ring();
    {
      std::lock_guard<std::mutex> lk(mu_);
      init_done_ = true;
      init_result_ = r;
    }
    ctl_cv_.notify_all();
    if (r < 0) return;
    arm_wake();
    std::vector<Chunk*> batch;
    batch.reserve(queue_depth_);
    std::vector<std::pair<uint64_t, int>> cqes(cq_entries_);
    for (;;) {
      Control* ctl;
      bool stop;
      {
        std::lock_guard<std::mutex> lk(mu_);
        stop = queue_.closed();
        ctl = control_;
        if (!ctl) {
          while (!queue_.empty() && inflight_ + batch.size() < queue_depth_) batch.push_back(queue_.pop());
          set_pending(queue_.size());
        }
      }
      if (ctl && inflight_ == 0) {
        do_control(ctl);
        continue;
      }
      for (Chunk* c : batch) dispatch(c);
      batch.clear();
      if (stop && inflight_ == 0) break;
      {
        // Decide whether to sleep only now: dispatch may have completed or parked chunks at once
        // (injected faults), freeing slots that queued work can use.
        std::lock_guard<std::mutex> lk(mu_);
        if (!queue_.closed() && !control_ && !queue_.empty() && inflight_ < queue_depth_) continue;
        need_wake_ = !queue_.closed() && inflight_ < queue_depth_;
      }
      int ret = io_uring_submit_and_wait(&ring_, 1);
      unsigned head;
      io_uring_cqe* cqe;
      size_t n = 0;
      io_uring_for_each_cqe(&ring_, head, cqe) {
        if (n == cqes.size()) break;
        cqes[n++] = {cqe->user_data, cqe->res};
      }
      io_uring_cq_advance(&ring_, static_cast<unsigned>(n));
      for (size_t i = 0; i < n; ++i) handle(cqes[i].first, cqes[i].second);
      if (ret < 0 && n == 0 && ret != -EINTR) {
        // EAGAIN/EBUSY (kernel short of resources, completion queue backlog) or anything else the
        // ring reports: chunks in flight still own their memory, so never give up on them; back off.
        timespec ts{0, 1000000};
        nanosleep(&ts, nullptr);
      }
    }
    Control* pending_ctl;
    {
      std::lock_guard<std::mutex> lk(mu_);
      pending_ctl = control_;
      need_wake_ = false;
    }
    if (pending_ctl) {
      pending_ctl->result = -ECANCELED;
      control_finished(pending_ctl);
    }
    if (!fixed_.empty()) io_uring_unregister_buffers(&ring_);
    io_uring_queue_exit(&ring_);
  }

  io_uring ring_;
  unsigned cq_entries_ = 0;
  int efd_ = -1;
  uint64_t efd_value_ = 0;
  std::thread thread_;

  std::mutex mu_;
  std::condition_variable ctl_cv_;
  ChunkQueue queue_;  // guarded by mu_
  bool need_wake_ = false;
  Control* control_ = nullptr;
  bool init_done_ = false;
  int init_result_ = 0;

  // Ring-thread state.
  uint32_t inflight_ = 0;
  std::vector<Fixed> fixed_;
};

}  // namespace

std::unique_ptr<Engine> make_uring_engine(uint32_t queue_depth, uint32_t block_size,
                                          const std::string& name, std::string* why) {
  auto eng = std::make_unique<UringEngine>(queue_depth, block_size, name);
  if (!eng->start(why)) return nullptr;
  return eng;
}

}  // namespace tierrt::io

#endif  // TIERRT_HAVE_LIBURING
