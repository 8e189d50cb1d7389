// tierrt's asynchronous I/O engine: reads and writes between files and memory.
//
// This header is free of Python: the pybind11 layer (io_engine_bindings.cpp) adds buffer-protocol
// handling, keep-alive references and the GIL on top of it.
//
// Model
// -----
// * A FileSet is one or more files that together hold a logical byte range [0, size), striped
//   RAID-0 style with `stripe` bytes per stripe unit (one path: the identity mapping). Each file is
//   opened twice: once with O_DIRECT (when the filesystem accepts it) and once buffered.
// * A Request is one read, write or sync of a FileSet. It is planned into Chunks: pieces that lie in
//   one file, no longer than the engine's block_size, split at file offsets that are multiples of
//   block_size. A piece whose file offset, length and memory address meet the O_DIRECT alignment
//   goes through the O_DIRECT descriptor; an unaligned head or tail (or a piece whose memory is not
//   aligned) goes through the buffered descriptor of the same file.
//   Why this is safe: the O_DIRECT offset alignment is never smaller than the page size, so a page of
//   the file is either transferred whole by O_DIRECT or only through the page cache within one
//   request, and the kernel keeps the two descriptors coherent for such non-overlapping ranges (a
//   direct transfer writes back and invalidates the cached pages of its own range). Overlapping
//   requests in flight at the same time are, as with any asynchronous I/O, the caller's business.
// * A backend executes chunks with at most queue_depth of them in flight across all requests:
//   ThreadBackend (a pool of pread/pwrite workers) or UringBackend (one io_uring driven by one
//   thread that submits, reaps in batches and resubmits remainders). Both share the fault injector
//   and the completion logic below, so both behave identically from the outside.
// * Errors never escape a backend thread: a failed chunk records its error in its Request (the
//   lowest-indexed failing chunk wins, so the error is deterministic), the other chunks run to their
//   end, and Request::wait() throws a NativeError("IOEngineError") naming path, file offset, length,
//   errno and its text. No other request is affected.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "native_error.hpp"

namespace tierrt::io {

enum class Op : uint8_t { Read = 0, Write = 1, Sync = 2 };
const char* op_name(Op op);

// Error: fail without touching the file. Short: transfer half, then report a short transfer.
// Torn: transfer half, then fail with the errno (a torn write). Stall: hold the chunk back (not in
// flight) until clear_faults() releases it (it then runs normally) or close() cancels it.
enum class FaultMode : uint8_t { None = 0, Error = 1, Short = 2, Torn = 3, Stall = 4 };

// One file of a FileSet.
struct File {
  std::string path;
  int fd_direct = -1;    // O_DIRECT descriptor, -1 when the filesystem refused O_DIRECT
  int fd_buffered = -1;  // ordinary descriptor of the same file
  bool created = false;  // this open() created the file
  bool unlinked = false;  // its name was removed right after open (open(..., unlink=true))
};

class FileSet {
 public:
  FileSet() = default;
  FileSet(const FileSet&) = delete;
  FileSet& operator=(const FileSet&) = delete;
  ~FileSet();

  std::vector<File> files;
  uint64_t size = 0;           // logical size
  uint64_t stripe = 0;         // bytes per stripe unit
  uint64_t file_size = 0;      // bytes of each file
  uint32_t offset_align = 4096;  // O_DIRECT file offset and length alignment (>= page size)
  uint32_t mem_align = 4096;     // O_DIRECT memory alignment
  bool direct = false;         // every file has an O_DIRECT descriptor

  // Marks the set closed (new requests are refused), waits for its requests in flight, closes the
  // descriptors and, with remove, unlinks the files. Idempotent. Blocks: call without the GIL.
  void close(bool remove);
  bool closed() const;

  // Request accounting used by close(): acquire() throws ConfigError when the set is closed.
  void acquire();
  void release();

  // Maps a logical offset to (file index, file offset).
  void map(uint64_t logical, size_t* file_index, uint64_t* file_offset) const;

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool closed_ = false;
  int64_t active_ = 0;
  void close_fds();
};

class Request;

// One piece of a request: lies in one file, transferred through one descriptor.
struct Chunk {
  Chunk* next = nullptr;  // intrusive link of the pending queue
  Request* req = nullptr;
  const File* file = nullptr;
  char* buf = nullptr;
  uint64_t file_off = 0;
  uint64_t logical_off = 0;
  uint32_t len = 0;
  uint32_t done = 0;   // bytes transferred so far
  uint32_t limit = 0;  // bytes to transfer: len, or less when a short/torn fault is armed
  uint32_t index = 0;
  int fault_errno = 0;
  uint16_t retries = 0;
  int16_t fixed_index = -1;  // io_uring registered buffer index, -1 when not registered
  Op op = Op::Read;
  bool direct = false;
  bool skip_fault = false;  // released from a stall: run without consulting the fault rules again
  FaultMode fault = FaultMode::None;

  int fd() const { return direct ? file->fd_direct : file->fd_buffered; }
};

// The chunks a backend has accepted but not yet dispatched, in order: an intrusive FIFO through
// Chunk::next. It has no lock of its own: the backend guards it with the mutex that also guards its
// wake-up state. Once closed it refuses chunks (the engine is shutting down).
class ChunkQueue {
 public:
  // Appends the list head..tail of n chunks; false, with nothing appended, once closed.
  bool push(Chunk* head, Chunk* tail, uint64_t n) {
    if (closed_) return false;
    if (tail_) {
      tail_->next = head;
    } else {
      head_ = head;
    }
    tail_ = tail;
    size_ += n;
    return true;
  }
  // The oldest chunk, or nullptr when empty.
  Chunk* pop() {
    Chunk* c = head_;
    if (c) {
      head_ = c->next;
      if (!head_) tail_ = nullptr;
      --size_;
    }
    return c;
  }
  // Refuses further chunks; returns those still queued (a list through Chunk::next) to be cancelled.
  Chunk* close() {
    closed_ = true;
    Chunk* rest = head_;
    head_ = tail_ = nullptr;
    size_ = 0;
    return rest;
  }
  bool empty() const { return head_ == nullptr; }
  bool closed() const { return closed_; }
  uint64_t size() const { return size_; }

 private:
  Chunk* head_ = nullptr;
  Chunk* tail_ = nullptr;
  uint64_t size_ = 0;
  bool closed_ = false;
};

// What went wrong with one chunk; formatted into a message only when someone asks.
struct ChunkError {
  enum Kind : uint8_t { Errno, Eof, Short, Cancelled };
  Kind kind = Errno;
  Op op = Op::Read;
  int err = 0;  // errno; 0 for a short transfer without an OS error
  bool injected = false;
  std::string path;
  uint64_t file_off = 0;
  uint64_t logical_off = 0;
  uint32_t len = 0;
  uint32_t transferred = 0;
};

class Engine;

class Request {
 public:
  Request(Op op, std::shared_ptr<FileSet> fs, uint64_t offset, uint64_t nbytes);
  Request(const Request&) = delete;
  Request& operator=(const Request&) = delete;
  ~Request();

  Op op() const { return op_; }
  uint64_t offset() const { return offset_; }
  uint64_t nbytes() const { return nbytes_; }
  const std::shared_ptr<FileSet>& fileset() const { return fs_; }
  size_t num_chunks() const { return chunks_.size(); }

  bool done() const { return finished_.load(std::memory_order_acquire); }
  bool failed() const;
  uint64_t transferred() const { return transferred_.load(std::memory_order_relaxed); }

  // Waits for completion; timeout_s < 0 waits forever. Returns false on timeout. Call without GIL.
  bool wait_for(double timeout_s);
  // After completion: returns the bytes transferred, or throws the IOEngineError.
  uint64_t result() const;
  // The error of a failed request as a NativeError (only valid when failed()).
  NativeError error() const;

 private:
  friend class Engine;
  Op op_;
  std::shared_ptr<FileSet> fs_;
  uint64_t offset_;
  uint64_t nbytes_;
  std::vector<Chunk> chunks_;
  std::atomic<uint32_t> remaining_{0};
  std::atomic<uint64_t> transferred_{0};
  std::atomic<bool> finished_{false};
  bool released_ = false;  // fs_->release() was called
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool has_error_ = false;
  uint32_t error_index_ = 0;
  ChunkError error_;
  std::shared_ptr<Request> self_;  // keeps the request alive while chunks are in flight
  Engine* engine_ = nullptr;
};

struct FaultRule {
  int op_mask = 7;  // bit 1 << Op
  int err = 5;
  std::string path_contains;
  uint64_t after = 0;
  int64_t count = 1;  // < 0: every matching chunk after `after`
  FaultMode mode = FaultMode::Error;
  uint64_t seen = 0;
  int64_t fired = 0;
};

struct Stats {
  std::string backend, backend_note, name;
  uint32_t queue_depth = 0, block_size = 0, threads = 0;
  uint64_t bytes_read = 0, bytes_written = 0, reads = 0, writes = 0, syncs = 0, chunks = 0;
  uint64_t errors = 0, chunk_errors = 0, faults_injected = 0, retries = 0, direct_fallbacks = 0;
  uint64_t direct_chunks = 0, buffered_chunks = 0, fixed_chunks = 0;
  uint64_t inflight = 0, pending = 0, stalled = 0, direct_files = 0, buffered_files = 0;
  uint64_t registered_buffers = 0, registered_bytes = 0;
  double busy_seconds = 0;
};

struct Region {
  uintptr_t base;
  uint64_t len;
};

class Engine {
 public:
  // backend: "auto", "io_uring" or "threads". Throws ConfigError for bad arguments and for
  // "io_uring" when it is not available (saying why).
  static std::unique_ptr<Engine> create(const std::string& backend, uint32_t queue_depth,
                                        uint32_t block_size, uint32_t threads, const std::string& name);

  virtual ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const std::string& backend() const { return backend_; }
  uint32_t queue_depth() const { return queue_depth_; }
  uint32_t block_size() const { return block_size_; }
  const std::string& name() const { return name_; }
  bool is_closed() const { return closed_.load(); }

  // Opens (creates, preallocates) a file set. With unlink, the name of each file this call creates
  // is removed as soon as its descriptors are open: the descriptors keep the space until the set is
  // closed, and the kernel frees it when the process dies in any way (SIGKILL included), so no file
  // is ever left behind. The path strings are kept for messages. Blocks: call without the GIL.
  std::shared_ptr<FileSet> open(const std::vector<std::string>& paths, uint64_t size, uint64_t stripe,
                                bool create, bool preallocate, bool direct, bool unlink = false);

  // Plans a request (validates range; throws ConfigError). Does not start it.
  std::shared_ptr<Request> prepare(Op op, const std::shared_ptr<FileSet>& fs, uint64_t offset,
                                   char* buf, uint64_t nbytes);
  // Starts prepared requests, in order, in one go. Never throws for I/O reasons.
  void submit(const std::vector<std::shared_ptr<Request>>& reqs);

  // Registers memory regions as io_uring fixed buffers (replacing earlier ones); returns how many
  // ring buffers they took (0 for the thread backend, where it is a no-op).
  virtual size_t register_buffers(const std::vector<Region>& regions);
  virtual void unregister_buffers();

  void inject_fault(const FaultRule& rule);
  void clear_faults();

  Stats stats() const;

  // Cancels queued chunks (their requests fail with ECANCELED), waits for chunks in flight, stops the
  // backend's threads. Idempotent. Blocks: call without the GIL.
  void close();

 protected:
  Engine(std::string backend, uint32_t queue_depth, uint32_t block_size, std::string name);

  // Backend interface.
  virtual void enqueue(Chunk* head, Chunk* tail, size_t n) = 0;  // takes chunks to run
  virtual void shutdown() = 0;  // after closed_: cancel queued chunks, join threads

  // Shared by backends.
  // Decides at dispatch whether a fault fires for this chunk. Returns true when the chunk was parked
  // by a stall fault: the backend must then forget it (clear_faults() or close() take it over).
  bool arm_fault(Chunk* c);
  // Completes a chunk: ok when err == 0 and kind == Errno; the chunk must not be touched afterwards.
  void complete(Chunk* c, ChunkError::Kind kind, int err);
  void complete_ok(Chunk* c) { complete(c, ChunkError::Errno, 0); }
  void cancel_list(Chunk* head);
  // In-flight accounting for stats (busy_seconds). Called by the backend around each chunk.
  void chunk_started();
  void chunk_finished();
  void note_retry() { retries_.fetch_add(1, std::memory_order_relaxed); }
  void note_direct_fallback() { direct_fallbacks_.fetch_add(1, std::memory_order_relaxed); }
  void note_fixed() { fixed_chunks_.fetch_add(1, std::memory_order_relaxed); }
  void set_pending(uint64_t n) { pending_.store(n, std::memory_order_relaxed); }
  // The shared part of enqueue(): under `mu`, appends the chunks to `queue` (and the pending count),
  // then runs `under_lock` (a backend's wake-up bookkeeping); once the queue is closed, cancels the
  // chunks instead. Returns whether they were queued.
  template <class UnderLock>
  bool queue_chunks(std::mutex& mu, ChunkQueue& queue, Chunk* head, Chunk* tail, size_t n,
                    UnderLock&& under_lock) {
    {
      std::lock_guard<std::mutex> lk(mu);
      if (queue.push(head, tail, n)) {
        set_pending(queue.size());
        under_lock();
        return true;
      }
    }
    cancel_list(head);
    return false;
  }
  // The shared part of shutdown(): under `mu`, closes `queue`; cancels what was still queued.
  void close_queue(std::mutex& mu, ChunkQueue& queue) {
    Chunk* rest;
    {
      std::lock_guard<std::mutex> lk(mu);
      rest = queue.close();
      set_pending(0);
    }
    cancel_list(rest);
  }

  std::string backend_;
  std::string backend_note_;
  uint32_t queue_depth_;
  uint32_t block_size_;
  uint32_t threads_ = 0;
  std::string name_;
  std::atomic<bool> closed_{false};
  std::atomic<uint64_t> registered_buffers_{0}, registered_bytes_{0};

 private:
  void finalize(Request* r);

  std::mutex close_mu_;
  std::atomic<bool> faults_active_{false};
  mutable std::mutex fault_mu_;
  std::vector<FaultRule> faults_;
  std::vector<Chunk*> stalled_;  // guarded by fault_mu_

  std::atomic<uint64_t> bytes_read_{0}, bytes_written_{0}, reads_{0}, writes_{0}, syncs_{0};
  std::atomic<uint64_t> chunks_{0}, errors_{0}, chunk_errors_{0}, faults_injected_{0};
  std::atomic<uint64_t> retries_{0}, direct_fallbacks_{0}, fixed_chunks_{0};
  std::atomic<uint64_t> direct_chunks_{0}, buffered_chunks_{0};
  std::atomic<uint64_t> direct_files_{0}, buffered_files_{0};
  std::atomic<uint64_t> pending_{0};

  mutable std::mutex busy_mu_;
  uint64_t inflight_ = 0;
  int64_t busy_ns_ = 0;
  int64_t busy_since_ns_ = 0;
};

// Backend factories (io_engine_threads.cpp, io_engine_uring.cpp).
std::unique_ptr<Engine> make_thread_engine(uint32_t queue_depth, uint32_t block_size, uint32_t threads,
                                           const std::string& name, const std::string& note);
#ifdef TIERRT_HAVE_LIBURING
// Returns nullptr and sets *why when the ring cannot be set up.
std::unique_ptr<Engine> make_uring_engine(uint32_t queue_depth, uint32_t block_size,
                                          const std::string& name, std::string* why);
#endif

int64_t monotonic_ns();

}  // namespace tierrt::io
