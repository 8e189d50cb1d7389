// tierrt I/O engine: file sets, request planning, completion, fault injection, statistics.
// The backends (io_engine_threads.cpp, io_engine_uring.cpp) only move chunks.
#include "io_engine.hpp"

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <set>

namespace tierrt::io {

namespace {

std::string errno_text(int err) {
  char buf[256];
  // GNU strerror_r returns a char*.
  const char* text = strerror_r(err, buf, sizeof(buf));
  return std::string(text) + " (errno " + std::to_string(err) + ")";
}

std::string dir_of(const std::string& path) {
  auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

bool is_path_errno(int err) {
  switch (err) {
    case ENOENT:
    case ENOTDIR:
    case EACCES:
    case EPERM:
    case EROFS:
    case EISDIR:
    case ELOOP:
    case ENAMETOOLONG:
    case ETXTBSY:
      return true;
    default:
      return false;
  }
}

NativeError path_error(const std::string& path, const char* verb, int err, bool create) {
  std::string msg = std::string("cannot ") + verb + " " + path + ": " + errno_text(err);
  if (err == EACCES || err == EPERM || err == EROFS) {
    msg += create ? "; the directory " + dir_of(path) +
                        " is not writable (permissions, an immutable attribute or a read-only filesystem)"
                  : "; the file is not writable (permissions, an immutable attribute or a read-only "
                    "filesystem)";
  } else if (err == ENOENT) {
    msg += create ? "; the directory " + dir_of(path) + " does not exist"
                  : "; the file does not exist (opened with create=False)";
  }
  const char* kind = is_path_errno(err) ? "TierPathError" : "IOEngineError";
  NativeError e(kind, msg);
  e.with("path", path).with("errno", static_cast<int64_t>(err));
  return e;
}

int open_retry(const char* path, int flags, mode_t mode) {
  for (;;) {
    int fd = ::open(path, flags, mode);
    if (fd >= 0 || errno != EINTR) return fd;
  }
}

NativeError config_error(const std::string& msg) { return NativeError("ConfigError", msg); }

}  // namespace

int64_t monotonic_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

const char* op_name(Op op) {
  switch (op) {
    case Op::Read:
      return "read";
    case Op::Write:
      return "write";
    case Op::Sync:
      return "sync";
  }
  return "?";
}

// ---------------------------------------------------------------------------------------------
// FileSet

FileSet::~FileSet() { close_fds(); }

void FileSet::close_fds() {
  for (auto& f : files) {
    if (f.fd_direct >= 0) ::close(f.fd_direct);
    if (f.fd_buffered >= 0) ::close(f.fd_buffered);
    f.fd_direct = f.fd_buffered = -1;
  }
}

void FileSet::close(bool remove) {
  std::unique_lock<std::mutex> lk(mu_);
  bool was_closed = closed_;
  closed_ = true;
  cv_.wait(lk, [&] { return active_ == 0; });
  if (!was_closed) close_fds();
  if (remove) {
    for (auto& f : files) {
      if (!f.path.empty() && !f.unlinked) ::unlink(f.path.c_str());
    }
  }
}

bool FileSet::closed() const {
  std::lock_guard<std::mutex> lk(mu_);
  return closed_;
}

void FileSet::acquire() {
  std::lock_guard<std::mutex> lk(mu_);
  if (closed_) {
    throw config_error("the file set " + (files.empty() ? std::string("?") : files[0].path) +
                       (files.size() > 1 ? " (+" + std::to_string(files.size() - 1) + " more)" : "") +
                       " is closed");
  }
  ++active_;
}

void FileSet::release() {
  std::lock_guard<std::mutex> lk(mu_);
  if (--active_ == 0) cv_.notify_all();
}

void FileSet::map(uint64_t logical, size_t* file_index, uint64_t* file_offset) const {
  size_t n = files.size();
  if (n == 1) {
    *file_index = 0;
    *file_offset = logical;
    return;
  }
  uint64_t unit = logical / stripe;
  *file_index = static_cast<size_t>(unit % n);
  *file_offset = (unit / n) * stripe + logical % stripe;
}

// ---------------------------------------------------------------------------------------------
// Request

Request::Request(Op op, std::shared_ptr<FileSet> fs, uint64_t offset, uint64_t nbytes)
    : op_(op), fs_(std::move(fs)), offset_(offset), nbytes_(nbytes) {}

Request::~Request() {
  if (!released_ && fs_) fs_->release();
}

bool Request::failed() const {
  std::lock_guard<std::mutex> lk(mu_);
  return has_error_;
}

bool Request::wait_for(double timeout_s) {
  if (done()) return true;
  std::unique_lock<std::mutex> lk(mu_);
  auto pred = [&] { return finished_.load(std::memory_order_acquire); };
  if (timeout_s < 0) {
    cv_.wait(lk, pred);
    return true;
  }
  auto dur = std::chrono::duration<double>(timeout_s);
  return cv_.wait_for(lk, std::chrono::duration_cast<std::chrono::nanoseconds>(dur), pred);
}

uint64_t Request::result() const {
  if (failed()) throw error();
  return transferred();
}

NativeError Request::error() const {
  ChunkError e;
  {
    std::lock_guard<std::mutex> lk(mu_);
    e = error_;
  }
  const char* op = op_name(e.op);
  std::string where = e.op == Op::Read ? " from " : " to ";
  std::string msg;
  switch (e.kind) {
    case ChunkError::Errno:
      if (e.op == Op::Sync) {
        msg = "fdatasync of " + e.path + " failed: " + errno_text(e.err);
      } else {
        msg = std::string(op) + " of " + format_size(e.len) + " at offset " + std::to_string(e.file_off) +
              where + e.path + " failed: " + errno_text(e.err);
        if (e.transferred > 0) {
          msg += ", after " + std::to_string(e.transferred) + " of " + std::to_string(e.len) +
                 " bytes were " + (e.op == Op::Read ? "read" : "written");
        }
      }
      break;
    case ChunkError::Eof:
      msg = "short read: " + std::to_string(e.transferred) + " of " + std::to_string(e.len) +
            " bytes at offset " + std::to_string(e.file_off) + " of " + e.path + ", end of file";
      break;
    case ChunkError::Short:
      msg = std::string("short ") + op + ": " + std::to_string(e.transferred) + " of " +
            std::to_string(e.len) + " bytes at offset " + std::to_string(e.file_off) + " of " + e.path;
      break;
    case ChunkError::Cancelled:
      msg = std::string(op) + " of " + format_size(e.len) + " at offset " + std::to_string(e.file_off) +
            where + e.path + " was cancelled because the I/O engine was closed: " + errno_text(e.err);
      break;
  }
  if (e.op != Op::Sync) {
    msg += " (part of a " + format_size(nbytes_) + " " + op + " at logical offset " +
           std::to_string(offset_) + ")";
  }
  if (e.injected) msg += " [injected fault]";
  NativeError err("IOEngineError", msg);
  err.with("path", e.path)
      .with("offset", static_cast<int64_t>(e.file_off))
      .with("nbytes", static_cast<int64_t>(e.len))
      .with("op", std::string(op))
      .with("transferred", static_cast<int64_t>(e.transferred))
      .with("logical_offset", static_cast<int64_t>(e.logical_off))
      .with("request_offset", static_cast<int64_t>(offset_))
      .with("request_nbytes", static_cast<int64_t>(nbytes_))
      .with("injected", static_cast<int64_t>(e.injected ? 1 : 0));
  if (e.err != 0) err.with("errno", static_cast<int64_t>(e.err));
  return err;
}

// ---------------------------------------------------------------------------------------------
// Engine

Engine::Engine(std::string backend, uint32_t queue_depth, uint32_t block_size, std::string name)
    : backend_(std::move(backend)),
      queue_depth_(queue_depth),
      block_size_(block_size),
      name_(std::move(name)) {}

Engine::~Engine() = default;

std::unique_ptr<Engine> Engine::create(const std::string& backend, uint32_t queue_depth,
                                       uint32_t block_size, uint32_t threads, const std::string& name) {
  if (queue_depth < 1 || queue_depth > 4096) {
    throw config_error("IOEngine: queue_depth must be between 1 and 4096, got " +
                       std::to_string(queue_depth));
  }
  if (block_size < 4096 || block_size % 4096 != 0 || block_size > (1u << 30)) {
    throw config_error("IOEngine: block_size must be a multiple of 4KiB between 4KiB and 1GiB, got " +
                       std::to_string(block_size));
  }
  if (threads > 1024) {
    throw config_error("IOEngine: threads must be at most 1024, got " + std::to_string(threads));
  }
  if (backend == "threads") return make_thread_engine(queue_depth, block_size, threads, name, "");
  if (backend != "auto" && backend != "io_uring") {
    throw config_error("IOEngine: backend must be 'auto', 'io_uring' or 'threads', got '" + backend + "'");
  }
#ifdef TIERRT_HAVE_LIBURING
  std::string why;
  auto eng = make_uring_engine(queue_depth, block_size, name, &why);
  if (eng) return eng;
  if (backend == "io_uring") throw config_error("IOEngine: io_uring is not available: " + why);
  return make_thread_engine(queue_depth, block_size, threads, name, "io_uring is not available: " + why);
#else
  if (backend == "io_uring") {
    throw config_error(
        "IOEngine: io_uring is not available: tierrt was built without liburing (install liburing-dev "
        "and rebuild)");
  }
  return make_thread_engine(queue_depth, block_size, threads, name,
                            "built without liburing: thread-pool backend only");
#endif
}

std::shared_ptr<FileSet> Engine::open(const std::vector<std::string>& paths, uint64_t size,
                                      uint64_t stripe, bool create, bool preallocate, bool direct,
                                      bool unlink) {
  if (closed_.load()) throw config_error("IOEngine '" + name_ + "' is closed");
  if (paths.empty()) throw config_error("IOEngine.open: at least one path is needed");
  if (size == 0) throw config_error("IOEngine.open: size must be positive");
  const long page = sysconf(_SC_PAGESIZE) > 0 ? sysconf(_SC_PAGESIZE) : 4096;
  if (stripe == 0 || stripe % static_cast<uint64_t>(page) != 0) {
    throw config_error("IOEngine.open: stripe must be a positive multiple of the page size (" +
                       std::to_string(page) + "), got " + std::to_string(stripe));
  }
  {
    std::set<std::string> seen;
    for (const auto& p : paths) {
      if (p.empty()) throw config_error("IOEngine.open: empty path");
      if (!seen.insert(p).second) throw config_error("IOEngine.open: path " + p + " is given twice");
    }
  }
  auto fs = std::make_shared<FileSet>();
  fs->size = size;
  fs->stripe = stripe;
  const uint64_t n = paths.size();
  if (n == 1) {
    fs->file_size = size;
  } else {
    uint64_t units = (size + stripe - 1) / stripe;
    fs->file_size = ((units + n - 1) / n) * stripe;
  }

  struct Undo {
    bool existed;
    off_t orig_size;
  };
  std::vector<Undo> undo;
  auto cleanup = [&]() {
    for (size_t i = 0; i < fs->files.size(); ++i) {
      File& f = fs->files[i];
      if (f.fd_buffered >= 0 && undo[i].existed) {
        struct stat st;
        if (fstat(f.fd_buffered, &st) == 0 && st.st_size > undo[i].orig_size) {
          (void)!ftruncate(f.fd_buffered, undo[i].orig_size);
        }
      }
      if (f.created && !f.unlinked) ::unlink(f.path.c_str());
      if (f.fd_direct >= 0) ::close(f.fd_direct);
      if (f.fd_buffered >= 0) ::close(f.fd_buffered);
      f.fd_direct = f.fd_buffered = -1;
    }
  };

  uint32_t offset_align = static_cast<uint32_t>(page);
  uint32_t mem_align = 0;
  bool all_direct = true;
  fs->files.reserve(paths.size());
  try {
    for (const auto& path : paths) {
      struct stat st;
      bool existed = ::stat(path.c_str(), &st) == 0;
      undo.push_back({existed, existed ? st.st_size : 0});
      fs->files.emplace_back();
      File& f = fs->files.back();
      f.path = path;
      int flags = O_RDWR | O_CLOEXEC | (create ? O_CREAT : 0);
      f.fd_buffered = open_retry(path.c_str(), flags, 0644);
      if (f.fd_buffered < 0) throw path_error(path, create ? "create" : "open", errno, create);
      f.created = create && !existed;
      if (fstat(f.fd_buffered, &st) != 0) throw path_error(path, "stat", errno, create);
      if (!S_ISREG(st.st_mode)) {
        NativeError e("TierPathError", "cannot use " + path + " as a tier file: it is not a regular file");
        e.with("path", path);
        throw e;
      }
      if (direct) {
        f.fd_direct = open_retry(path.c_str(), O_RDWR | O_CLOEXEC | O_DIRECT, 0);
        if (f.fd_direct < 0) {
          int err = errno;
          if (err != EINVAL) throw path_error(path, "open (O_DIRECT)", err, false);
        }
      }
      if (unlink && f.created) {  // both descriptors are open: the name is no longer needed
        if (::unlink(path.c_str()) != 0) throw path_error(path, "unlink", errno, create);
        f.unlinked = true;
      }
      if (f.fd_direct < 0) {
        all_direct = false;
      } else {
        uint32_t dio_mem = 0, dio_off = 0;
#if defined(STATX_DIOALIGN)
        struct statx sx;
        if (statx(f.fd_direct, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) == 0 &&
            (sx.stx_mask & STATX_DIOALIGN) && sx.stx_dio_offset_align > 0) {
          dio_mem = sx.stx_dio_mem_align;
          dio_off = sx.stx_dio_offset_align;
        }
#endif
        if (dio_off == 0) {  // unknown: assume 4KiB, the common logical block size of SSDs
          dio_off = 4096;
          dio_mem = 4096;
        }
        // Offsets never finer than a page (see the coherency note in io_engine.hpp) nor than the
        // filesystem block, when that is a sane size (sub-block direct writes are serialised).
        offset_align = std::max<uint32_t>(offset_align, dio_off);
        if (st.st_blksize > 0 && st.st_blksize <= 65536) {
          offset_align = std::max<uint32_t>(offset_align, static_cast<uint32_t>(st.st_blksize));
        }
        mem_align = std::max<uint32_t>(mem_align, std::max<uint32_t>(dio_mem, 1));
      }
    }
    // Preallocate every file before any data is written.
    for (size_t i = 0; i < fs->files.size(); ++i) {
      File& f = fs->files[i];
      if (!create) continue;
      struct stat st;
      if (fstat(f.fd_buffered, &st) != 0) throw path_error(f.path, "stat", errno, create);
      int err = 0;
      const char* how = "preallocate";
      if (preallocate) {
        int r;
        do {
          r = fallocate(f.fd_buffered, 0, 0, static_cast<off_t>(fs->file_size));
        } while (r != 0 && errno == EINTR);
        err = r == 0 ? 0 : errno;
        if (err == EOPNOTSUPP) {
          err = posix_fallocate(f.fd_buffered, 0, static_cast<off_t>(fs->file_size));
          if (err == EOPNOTSUPP || err == EINVAL) {
            err = 0;
            if (static_cast<uint64_t>(st.st_size) < fs->file_size &&
                ftruncate(f.fd_buffered, static_cast<off_t>(fs->file_size)) != 0) {
              err = errno;
              how = "extend";
            }
          }
        }
      } else if (static_cast<uint64_t>(st.st_size) < fs->file_size) {
        if (ftruncate(f.fd_buffered, static_cast<off_t>(fs->file_size)) != 0) {
          err = errno;
          how = "extend";
        }
      }
      if (err != 0) {
        std::string msg = std::string("cannot ") + how + " " + format_size(fs->file_size) + " for " +
                          f.path + ": " + errno_text(err) + "; nothing was written";
        if (err == ENOSPC || err == EDQUOT) {
          msg += " (the filesystem of " + dir_of(f.path) + " has less free space than the file set needs: " +
                 format_size(fs->file_size) + " per file, " + std::to_string(n) + " file" +
                 (n > 1 ? "s" : "") + ")";
        }
        NativeError e(is_path_errno(err) ? "TierPathError" : "IOEngineError", msg);
        e.with("path", f.path)
            .with("errno", static_cast<int64_t>(err))
            .with("offset", static_cast<int64_t>(0))
            .with("nbytes", static_cast<int64_t>(fs->file_size))
            .with("op", std::string(how));
        throw e;
      }
    }
  } catch (...) {
    cleanup();
    throw;
  }
  fs->offset_align = offset_align;
  fs->mem_align = mem_align == 0 ? 4096 : mem_align;
  fs->direct = all_direct;
  for (const auto& f : fs->files) {
    if (f.fd_direct >= 0) {
      direct_files_.fetch_add(1, std::memory_order_relaxed);
    } else {
      buffered_files_.fetch_add(1, std::memory_order_relaxed);
    }
  }
  return fs;
}

std::shared_ptr<Request> Engine::prepare(Op op, const std::shared_ptr<FileSet>& fs, uint64_t offset,
                                         char* buf, uint64_t nbytes) {
  if (closed_.load()) throw config_error("IOEngine '" + name_ + "' is closed");
  if (!fs) throw config_error("IOEngine: no file set given");
  if (op != Op::Sync) {
    if (offset > fs->size || nbytes > fs->size - offset) {
      throw config_error(std::string(op_name(op)) + " of " + std::to_string(nbytes) + " bytes at offset " +
                         std::to_string(offset) + " is outside the file set " + fs->files[0].path +
                         (fs->files.size() > 1 ? " (+" + std::to_string(fs->files.size() - 1) + " more)"
                                               : std::string()) +
                         " of " + std::to_string(fs->size) + " bytes");
    }
    if (nbytes > 0 && buf == nullptr) throw config_error(std::string(op_name(op)) + ": null buffer");
  }
  fs->acquire();
  std::shared_ptr<Request> r;
  try {
    r = std::make_shared<Request>(op, fs, offset, nbytes);
  } catch (...) {
    fs->release();
    throw;
  }
  auto& chunks = r->chunks_;
  auto emit = [&](const File* file, uint64_t foff, uint64_t loff, char* p, uint64_t len, bool d) {
    Chunk c;
    c.req = r.get();
    c.file = file;
    c.buf = p;
    c.file_off = foff;
    c.logical_off = loff;
    c.len = static_cast<uint32_t>(len);
    c.limit = c.len;
    c.index = static_cast<uint32_t>(chunks.size());
    c.op = op;
    c.direct = d;
    chunks.push_back(c);
    (d ? direct_chunks_ : buffered_chunks_).fetch_add(1, std::memory_order_relaxed);
  };
  if (op == Op::Sync) {
    for (const auto& f : fs->files) emit(&f, 0, 0, nullptr, 0, false);
    return r;
  }
  chunks.reserve(nbytes / block_size_ + 2 * fs->files.size() + 3);
  const uint64_t A = fs->offset_align;
  const uint64_t M = fs->mem_align;
  const uint64_t bs = block_size_;
  uint64_t pos = offset;
  const uint64_t end = offset + nbytes;
  char* p = buf;
  while (pos < end) {
    size_t fi;
    uint64_t foff;
    fs->map(pos, &fi, &foff);
    uint64_t lim = end;
    if (fs->files.size() > 1) lim = std::min(lim, (pos / fs->stripe + 1) * fs->stripe);
    lim = std::min(lim, pos + (bs - foff % bs));
    const uint64_t len = lim - pos;
    const File* file = &fs->files[fi];
    if (file->fd_direct < 0) {
      emit(file, foff, pos, p, len, false);
    } else {
      uint64_t head = std::min(len, (A - foff % A) % A);
      uint64_t rest = len - head;
      uint64_t mid = rest - rest % A;
      uint64_t tail = rest - mid;
      if (mid == 0 || reinterpret_cast<uintptr_t>(p + head) % M != 0) {
        emit(file, foff, pos, p, len, false);
      } else {
        if (head) emit(file, foff, pos, p, head, false);
        emit(file, foff + head, pos + head, p + head, mid, true);
        if (tail) emit(file, foff + head + mid, pos + head + mid, p + head + mid, tail, false);
      }
    }
    p += len;
    pos = lim;
  }
  return r;
}

void Engine::submit(const std::vector<std::shared_ptr<Request>>& reqs) {
  Chunk* head = nullptr;
  Chunk* tail = nullptr;
  size_t n = 0;
  for (const auto& r : reqs) {
    if (r->self_ || r->done()) {
      throw config_error("IOEngine: a request can be submitted only once");
    }
  }
  for (const auto& r : reqs) {
    switch (r->op_) {
      case Op::Read:
        reads_.fetch_add(1, std::memory_order_relaxed);
        break;
      case Op::Write:
        writes_.fetch_add(1, std::memory_order_relaxed);
        break;
      case Op::Sync:
        syncs_.fetch_add(1, std::memory_order_relaxed);
        break;
    }
    if (r->chunks_.empty()) {
      finalize(r.get());
      continue;
    }
    r->remaining_.store(static_cast<uint32_t>(r->chunks_.size()), std::memory_order_relaxed);
    r->self_ = r;
    r->engine_ = this;
    auto& ch = r->chunks_;
    for (size_t i = 0; i + 1 < ch.size(); ++i) ch[i].next = &ch[i + 1];
    ch.back().next = nullptr;
    if (tail) {
      tail->next = &ch.front();
    } else {
      head = &ch.front();
    }
    tail = &ch.back();
    n += ch.size();
  }
  if (!head) return;
  if (closed_.load()) {
    cancel_list(head);
  } else {
    enqueue(head, tail, n);
  }
}

void Engine::cancel_list(Chunk* head) {
  while (head) {
    Chunk* next = head->next;
    complete(head, ChunkError::Cancelled, ECANCELED);
    head = next;
  }
}

void Engine::complete(Chunk* c, ChunkError::Kind kind, int err) {
  Request* r = c->req;
  const bool ok = kind == ChunkError::Errno && err == 0;
  const uint32_t got = c->done;
  if (c->op == Op::Read) {
    bytes_read_.fetch_add(got, std::memory_order_relaxed);
  } else if (c->op == Op::Write) {
    bytes_written_.fetch_add(got, std::memory_order_relaxed);
  }
  if (kind != ChunkError::Cancelled) chunks_.fetch_add(1, std::memory_order_relaxed);
  if (!ok) {
    chunk_errors_.fetch_add(1, std::memory_order_relaxed);
    std::lock_guard<std::mutex> lk(r->mu_);
    if (!r->has_error_ || c->index < r->error_index_) {
      r->has_error_ = true;
      r->error_index_ = c->index;
      ChunkError& e = r->error_;
      e.kind = kind;
      e.op = c->op;
      e.err = err;
      e.injected = c->fault != FaultMode::None && kind != ChunkError::Cancelled;
      e.path = c->file->path;
      e.file_off = c->file_off;
      e.logical_off = c->logical_off;
      e.len = c->len;
      e.transferred = got;
    }
  }
  if (got) r->transferred_.fetch_add(got, std::memory_order_relaxed);
  if (r->remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) finalize(r);
}

void Engine::finalize(Request* r) {
  std::shared_ptr<Request> keep = std::move(r->self_);  // may be the last reference: dies at return
  bool failed;
  {
    std::lock_guard<std::mutex> lk(r->mu_);
    failed = r->has_error_;
  }
  if (failed) errors_.fetch_add(1, std::memory_order_relaxed);
  if (!r->released_) {
    r->released_ = true;
    r->fs_->release();
  }
  {
    std::lock_guard<std::mutex> lk(r->mu_);
    r->finished_.store(true, std::memory_order_release);
  }
  r->cv_.notify_all();
}

bool Engine::arm_fault(Chunk* c) {
  if (c->skip_fault) {  // set before the chunk was queued again: ordered by the queue's mutex
    c->skip_fault = false;
    return false;
  }
  if (!faults_active_.load(std::memory_order_acquire)) return false;
  std::lock_guard<std::mutex> lk(fault_mu_);
  for (auto& rule : faults_) {
    if (!(rule.op_mask & (1 << static_cast<int>(c->op)))) continue;
    if (!rule.path_contains.empty() && c->file->path.find(rule.path_contains) == std::string::npos) continue;
    if (rule.seen < rule.after) {
      ++rule.seen;
      continue;
    }
    if (rule.count >= 0 && rule.fired >= rule.count) continue;
    ++rule.fired;
    faults_injected_.fetch_add(1, std::memory_order_relaxed);
    c->fault = rule.mode;
    c->fault_errno = rule.err;
    if (c->fault == FaultMode::Stall) {
      if (!closed_.load()) {
        stalled_.push_back(c);
        return true;
      }
      c->fault = FaultMode::Error;  // closing: a stalled chunk would be cancelled anyway
      c->fault_errno = ECANCELED;
    }
    if (c->op == Op::Sync && c->fault != FaultMode::Error) c->fault = FaultMode::Error;
    if (c->fault == FaultMode::Short || c->fault == FaultMode::Torn) {
      c->limit = c->len / 2;
      const FileSet& fs = *c->req->fileset();
      if (c->direct && (c->limit % fs.offset_align != 0)) c->direct = false;
    }
    break;
  }
  return false;
}

void Engine::inject_fault(const FaultRule& rule) {
  std::lock_guard<std::mutex> lk(fault_mu_);
  faults_.push_back(rule);
  faults_active_.store(true, std::memory_order_release);
}

void Engine::clear_faults() {
  std::vector<Chunk*> released;
  {
    std::lock_guard<std::mutex> lk(fault_mu_);
    faults_.clear();
    released.swap(stalled_);
    faults_active_.store(false, std::memory_order_release);
  }
  if (released.empty()) return;
  for (size_t i = 0; i < released.size(); ++i) {
    Chunk* c = released[i];
    c->fault = FaultMode::None;
    c->fault_errno = 0;
    c->skip_fault = true;
    c->next = i + 1 < released.size() ? released[i + 1] : nullptr;
  }
  if (closed_.load()) {
    cancel_list(released.front());
  } else {
    enqueue(released.front(), released.back(), released.size());
  }
}

size_t Engine::register_buffers(const std::vector<Region>& regions) { return 0; }
void Engine::unregister_buffers() {}

void Engine::chunk_started() {
  std::lock_guard<std::mutex> lk(busy_mu_);
  if (inflight_++ == 0) busy_since_ns_ = monotonic_ns();
}

void Engine::chunk_finished() {
  std::lock_guard<std::mutex> lk(busy_mu_);
  if (--inflight_ == 0) busy_ns_ += monotonic_ns() - busy_since_ns_;
}

Stats Engine::stats() const {
  Stats s;
  s.backend = backend_;
  s.backend_note = backend_note_;
  s.name = name_;
  s.queue_depth = queue_depth_;
  s.block_size = block_size_;
  s.threads = threads_;
  s.bytes_read = bytes_read_.load();
  s.bytes_written = bytes_written_.load();
  s.reads = reads_.load();
  s.writes = writes_.load();
  s.syncs = syncs_.load();
  s.chunks = chunks_.load();
  s.errors = errors_.load();
  s.chunk_errors = chunk_errors_.load();
  s.faults_injected = faults_injected_.load();
  s.retries = retries_.load();
  s.direct_fallbacks = direct_fallbacks_.load();
  s.direct_chunks = direct_chunks_.load();
  s.buffered_chunks = buffered_chunks_.load();
  s.fixed_chunks = fixed_chunks_.load();
  s.pending = pending_.load();
  {
    std::lock_guard<std::mutex> lk(fault_mu_);
    s.stalled = stalled_.size();
  }
  s.direct_files = direct_files_.load();
  s.buffered_files = buffered_files_.load();
  s.registered_buffers = registered_buffers_.load();
  s.registered_bytes = registered_bytes_.load();
  {
    std::lock_guard<std::mutex> lk(busy_mu_);
    s.inflight = inflight_;
    int64_t busy = busy_ns_;
    if (inflight_ > 0) busy += monotonic_ns() - busy_since_ns_;
    s.busy_seconds = static_cast<double>(busy) * 1e-9;
  }
  return s;
}

void Engine::close() {
  std::lock_guard<std::mutex> lk(close_mu_);
  if (closed_.exchange(true)) return;
  shutdown();
  std::vector<Chunk*> stalled;
  {
    std::lock_guard<std::mutex> lk(fault_mu_);
    stalled.swap(stalled_);
  }
  for (Chunk* c : stalled) complete(c, ChunkError::Cancelled, ECANCELED);
}

}  // namespace tierrt::io
