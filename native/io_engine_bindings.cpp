// Python bindings of the I/O engine: tierrt._native.IOEngine, FileSet, Request.
//
// Memory safety across the boundary: a request takes a buffer-protocol view of its buffer (or a
// reference to the keepalive object of a raw address) and gives it back only when the request is
// complete. If the Python Request object is dropped while its I/O is still in flight, the view moves
// to the engine's list of orphans, released (under the GIL) by a later engine call or by close().
// Native threads never touch Python objects.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "io_engine.hpp"
#include "native_error.hpp"

namespace py = pybind11;

namespace tierrt {

namespace {

using io::Engine;
using io::FileSet;
using io::Op;
using io::Request;

NativeError config_error(const std::string& msg) { return NativeError("ConfigError", msg); }

// Python resources that must outlive a request's I/O. Only touched with the GIL held.
struct Keep {
  Py_buffer view{};
  bool has_view = false;
  py::object keepalive;

  Keep() = default;
  Keep(const Keep&) = delete;
  Keep& operator=(const Keep&) = delete;
  ~Keep() { release(); }
  void release() {
    if (has_view) {
      PyBuffer_Release(&view);
      has_view = false;
    }
    keepalive = py::object();
  }
};

struct Orphans {
  std::vector<std::pair<std::shared_ptr<Request>, std::unique_ptr<Keep>>> list;

  void sweep() {
    size_t j = 0;
    for (size_t i = 0; i < list.size(); ++i) {
      if (list[i].first->done()) {
        list[i].second.reset();
      } else {
        if (i != j) list[j] = std::move(list[i]);
        ++j;
      }
    }
    list.resize(j);
  }
};

class PyRequest {
 public:
  PyRequest(std::shared_ptr<Request> req, std::unique_ptr<Keep> keep, std::shared_ptr<Orphans> orphans)
      : req_(std::move(req)), keep_(std::move(keep)), orphans_(std::move(orphans)) {}
  PyRequest(const PyRequest&) = delete;
  PyRequest& operator=(const PyRequest&) = delete;
  ~PyRequest() {
    if (!keep_) return;
    if (req_->done()) {
      keep_.reset();
    } else {
      orphans_->list.emplace_back(req_, std::move(keep_));
    }
  }

  uint64_t wait(std::optional<double> timeout) {
    if (timeout && *timeout < 0) throw config_error("Request.wait: timeout cannot be negative");
    // Wait in slices so that Ctrl-C (or any signal handler raising) interrupts a long wait; the
    // request stays in flight and keeps its buffer.
    const auto start = std::chrono::steady_clock::now();
    bool ok = false;
    for (;;) {
      double slice = 0.1;
      if (timeout) {
        double left = *timeout - std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        slice = std::max(0.0, std::min(slice, left));
      }
      {
        py::gil_scoped_release nogil;
        ok = req_->wait_for(slice);
      }
      if (ok) break;
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();
      if (timeout && std::chrono::steady_clock::now() - start >= std::chrono::duration<double>(*timeout)) break;
    }
    if (!ok) {
      std::string msg = std::string(io::op_name(req_->op())) + " of " + format_size(req_->nbytes()) +
                        " at offset " + std::to_string(req_->offset()) + " did not complete within " +
                        std::to_string(*timeout) + " s (it is still in flight)";
      PyErr_SetString(PyExc_TimeoutError, msg.c_str());
      throw py::error_already_set();
    }
    keep_.reset();
    return req_->result();
  }

  bool done() {
    bool d = req_->done();
    if (d) keep_.reset();
    return d;
  }

  const std::shared_ptr<Request>& req() const { return req_; }

 private:
  std::shared_ptr<Request> req_;
  std::unique_ptr<Keep> keep_;
  std::shared_ptr<Orphans> orphans_;
};

Op parse_op(const std::string& s) {
  if (s == "read") return Op::Read;
  if (s == "write") return Op::Write;
  throw config_error("IOEngine.submit: op must be 'read' or 'write', got '" + s + "'");
}

uint64_t to_u64(const py::handle& v, const char* what) {
  if (!py::isinstance<py::int_>(v) || py::isinstance<py::bool_>(v)) {
    throw config_error(std::string(what) + " must be an int, got " + std::string(py::str(py::type::of(v))));
  }
  long long x = v.cast<long long>();
  if (x < 0) throw config_error(std::string(what) + " cannot be negative, got " + std::to_string(x));
  return static_cast<uint64_t>(x);
}

// Takes a contiguous view of a buffer-protocol object.
std::unique_ptr<Keep> take_view(const py::handle& obj, bool writable) {
  auto keep = std::make_unique<Keep>();
  int flags = PyBUF_ANY_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
  if (PyObject_GetBuffer(obj.ptr(), &keep->view, flags) != 0) {
    PyErr_Clear();
    std::string type = py::str(py::type::of(obj));
    if (writable && PyObject_CheckBuffer(obj.ptr())) {
      Py_buffer probe;
      if (PyObject_GetBuffer(obj.ptr(), &probe, PyBUF_ANY_CONTIGUOUS) == 0) {
        PyBuffer_Release(&probe);
        throw config_error("read: the destination buffer (" + type + ") is read-only");
      }
      PyErr_Clear();
    }
    throw config_error("the buffer (" + type +
                       ") must be a contiguous object with the buffer protocol: bytearray, numpy array, "
                       "memoryview, ArenaBuffer (or pass an address with read_ptr/write_ptr)");
  }
  keep->has_view = true;
  return keep;
}

class PyEngine {
 public:
  PyEngine(const std::string& backend, int64_t queue_depth, int64_t block_size, int64_t threads,
           const std::string& name)
      : orphans_(std::make_shared<Orphans>()) {
    if (queue_depth < 1 || queue_depth > 4096) {
      throw config_error("IOEngine: queue_depth must be between 1 and 4096, got " +
                         std::to_string(queue_depth));
    }
    if (block_size < 4096 || block_size > (int64_t(1) << 30) || block_size % 4096 != 0) {
      throw config_error("IOEngine: block_size must be a multiple of 4KiB between 4KiB and 1GiB, got " +
                         std::to_string(block_size));
    }
    if (threads < 0 || threads > 1024) {
      throw config_error("IOEngine: threads must be between 0 and 1024, got " + std::to_string(threads));
    }
    py::gil_scoped_release nogil;
    engine_ = Engine::create(backend, static_cast<uint32_t>(queue_depth), static_cast<uint32_t>(block_size),
                             static_cast<uint32_t>(threads), name);
  }

  ~PyEngine() {
    if (engine_) {
      {
        py::gil_scoped_release nogil;
        engine_->close();
      }
      orphans_->sweep();
      registered_.clear();
    }
  }

  Engine& eng() { return *engine_; }

  std::shared_ptr<FileSet> open(const py::object& paths, int64_t size, int64_t stripe, bool create,
                                bool preallocate, bool direct, bool unlink) {
    std::vector<std::string> list;
    if (py::isinstance<py::str>(paths)) {
      list.push_back(paths.cast<std::string>());
    } else if (py::hasattr(paths, "__fspath__")) {
      list.push_back(py::str(paths.attr("__fspath__")()).cast<std::string>());
    } else {
      for (auto item : paths) {
        if (py::hasattr(item, "__fspath__")) {
          list.push_back(py::str(item.attr("__fspath__")()).cast<std::string>());
        } else {
          list.push_back(py::str(item).cast<std::string>());
        }
      }
    }
    if (size <= 0) throw config_error("IOEngine.open: size must be positive, got " + std::to_string(size));
    if (stripe <= 0) throw config_error("IOEngine.open: stripe must be positive, got " + std::to_string(stripe));
    orphans_->sweep();
    py::gil_scoped_release nogil;
    return engine_->open(list, static_cast<uint64_t>(size), static_cast<uint64_t>(stripe), create, preallocate,
                         direct, unlink);
  }

  // Plans one request from Python arguments. Buffer: buffer-protocol object or int address.
  std::pair<std::shared_ptr<Request>, std::unique_ptr<Keep>> plan(Op op, const std::shared_ptr<FileSet>& fs,
                                                                  const py::handle& offset,
                                                                  const py::handle& buffer,
                                                                  const py::handle& nbytes,
                                                                  const py::handle& keepalive) {
    if (!fs) throw config_error(std::string(io::op_name(op)) + ": no file set given");
    uint64_t off = to_u64(offset, "offset");
    std::unique_ptr<Keep> keep;
    char* ptr;
    uint64_t n;
    if (py::isinstance<py::int_>(buffer) && !py::isinstance<py::bool_>(buffer)) {
      ptr = reinterpret_cast<char*>(static_cast<uintptr_t>(to_u64(buffer, "address")));
      if (nbytes.is_none()) throw config_error("nbytes is required with a raw address");
      n = to_u64(nbytes, "nbytes");
      keep = std::make_unique<Keep>();
      keep->keepalive = py::reinterpret_borrow<py::object>(keepalive);
    } else {
      keep = take_view(buffer, op == Op::Read);
      ptr = static_cast<char*>(keep->view.buf);
      uint64_t have = static_cast<uint64_t>(keep->view.len);
      n = nbytes.is_none() ? have : to_u64(nbytes, "nbytes");
      if (n > have) {
        throw config_error(std::string(io::op_name(op)) + " of " + std::to_string(n) +
                           " bytes does not fit the buffer of " + std::to_string(have) + " bytes");
      }
    }
    auto req = engine_->prepare(op, fs, off, ptr, n);
    return {std::move(req), std::move(keep)};
  }

  std::unique_ptr<PyRequest> one(Op op, const std::shared_ptr<FileSet>& fs, const py::handle& offset,
                                 const py::handle& buffer, const py::handle& nbytes,
                                 const py::handle& keepalive) {
    orphans_->sweep();
    auto planned = plan(op, fs, offset, buffer, nbytes, keepalive);
    std::vector<std::shared_ptr<Request>> reqs{planned.first};
    {
      py::gil_scoped_release nogil;
      engine_->submit(reqs);
    }
    return std::make_unique<PyRequest>(std::move(planned.first), std::move(planned.second), orphans_);
  }

  py::list submit(const py::iterable& ops) {
    orphans_->sweep();
    std::vector<std::shared_ptr<Request>> reqs;
    std::vector<std::unique_ptr<Keep>> keeps;
    for (auto item : ops) {
      if (!py::isinstance<py::tuple>(item) || (py::len(item) != 5 && py::len(item) != 6)) {
        throw config_error(
            "IOEngine.submit: each op must be a tuple (op, fileset, offset, buffer, nbytes) or "
            "(op, fileset, offset, address, nbytes, keepalive)");
      }
      py::tuple t = py::reinterpret_borrow<py::tuple>(item);
      Op op = parse_op(t[0].cast<std::string>());
      auto fs = t[1].cast<std::shared_ptr<FileSet>>();
      py::object keepalive = t.size() == 6 ? py::object(t[5]) : py::none();
      auto planned = plan(op, fs, t[2], t[3], t[4], keepalive);
      reqs.push_back(std::move(planned.first));
      keeps.push_back(std::move(planned.second));
    }
    {
      py::gil_scoped_release nogil;
      engine_->submit(reqs);
    }
    py::list out;
    for (size_t i = 0; i < reqs.size(); ++i) {
      out.append(py::cast(std::make_unique<PyRequest>(std::move(reqs[i]), std::move(keeps[i]), orphans_)));
    }
    return out;
  }

  std::unique_ptr<PyRequest> sync(const std::shared_ptr<FileSet>& fs) {
    orphans_->sweep();
    if (!fs) throw config_error("sync: no file set given");
    auto req = engine_->prepare(Op::Sync, fs, 0, nullptr, 0);
    std::vector<std::shared_ptr<Request>> reqs{req};
    {
      py::gil_scoped_release nogil;
      engine_->submit(reqs);
    }
    return std::make_unique<PyRequest>(std::move(req), nullptr, orphans_);
  }

  size_t register_buffers(const py::iterable& buffers) {
    std::vector<io::Region> regions;
    std::vector<std::unique_ptr<Keep>> keeps;
    for (auto item : buffers) {
      if (py::isinstance<py::tuple>(item)) {
        py::tuple t = py::reinterpret_borrow<py::tuple>(item);
        if (t.size() != 2) throw config_error("register_buffers: a tuple must be (address, nbytes)");
        regions.push_back({static_cast<uintptr_t>(to_u64(t[0], "address")), to_u64(t[1], "nbytes")});
      } else {
        auto keep = take_view(item, false);
        regions.push_back({reinterpret_cast<uintptr_t>(keep->view.buf), static_cast<uint64_t>(keep->view.len)});
        keeps.push_back(std::move(keep));
      }
    }
    size_t n;
    {
      py::gil_scoped_release nogil;
      n = engine_->register_buffers(regions);
    }
    registered_ = std::move(keeps);  // views of the previous registration are released here
    return n;
  }

  void unregister_buffers() {
    {
      py::gil_scoped_release nogil;
      engine_->unregister_buffers();
    }
    registered_.clear();
  }

  void inject_fault(const std::string& op, int err, const std::string& path_contains, int64_t after,
                    int64_t count, const std::string& mode) {
    io::FaultRule rule;
    if (op == "any") {
      rule.op_mask = 7;
    } else if (op == "read") {
      rule.op_mask = 1 << static_cast<int>(Op::Read);
    } else if (op == "write") {
      rule.op_mask = 1 << static_cast<int>(Op::Write);
    } else if (op == "sync") {
      rule.op_mask = 1 << static_cast<int>(Op::Sync);
    } else {
      throw config_error("inject_fault: op must be 'any', 'read', 'write' or 'sync', got '" + op + "'");
    }
    if (mode == "error") {
      rule.mode = io::FaultMode::Error;
    } else if (mode == "short") {
      rule.mode = io::FaultMode::Short;
    } else if (mode == "torn") {
      rule.mode = io::FaultMode::Torn;
    } else if (mode == "stall") {
      rule.mode = io::FaultMode::Stall;
    } else {
      throw config_error("inject_fault: mode must be 'error', 'short', 'torn' or 'stall', got '" + mode + "'");
    }
    if (err <= 0 && (rule.mode == io::FaultMode::Error || rule.mode == io::FaultMode::Torn)) {
      throw config_error("inject_fault: errno must be a positive error number, got " + std::to_string(err));
    }
    if (after < 0) throw config_error("inject_fault: after cannot be negative");
    if (count == 0) throw config_error("inject_fault: count must be positive (or -1 for every chunk)");
    rule.err = err;
    rule.path_contains = path_contains;
    rule.after = static_cast<uint64_t>(after);
    rule.count = count < 0 ? -1 : count;
    engine_->inject_fault(rule);
  }

  py::dict stats() {
    orphans_->sweep();
    io::Stats s = engine_->stats();
    py::dict d;
    d["backend"] = s.backend;
    d["name"] = s.name;
    d["queue_depth"] = s.queue_depth;
    d["block_size"] = s.block_size;
    d["threads"] = s.threads;
    d["bytes_read"] = s.bytes_read;
    d["bytes_written"] = s.bytes_written;
    d["reads"] = s.reads;
    d["writes"] = s.writes;
    d["syncs"] = s.syncs;
    d["chunks"] = s.chunks;
    d["errors"] = s.errors;
    d["chunk_errors"] = s.chunk_errors;
    d["faults_injected"] = s.faults_injected;
    d["retries"] = s.retries;
    d["direct_fallbacks"] = s.direct_fallbacks;
    d["direct_chunks"] = s.direct_chunks;
    d["buffered_chunks"] = s.buffered_chunks;
    d["fixed_chunks"] = s.fixed_chunks;
    d["busy_seconds"] = s.busy_seconds;
    d["inflight"] = s.inflight;
    d["pending"] = s.pending;
    d["stalled"] = s.stalled;
    d["direct_files"] = s.direct_files;
    d["buffered_files"] = s.buffered_files;
    d["registered_buffers"] = s.registered_buffers;
    d["registered_bytes"] = s.registered_bytes;
    d["backend_note"] = s.backend_note;
    return d;
  }

  void close() {
    {
      py::gil_scoped_release nogil;
      engine_->close();
    }
    orphans_->sweep();
    registered_.clear();
  }

 private:
  std::unique_ptr<Engine> engine_;
  std::shared_ptr<Orphans> orphans_;
  std::vector<std::unique_ptr<Keep>> registered_;
};

std::string fileset_repr(const FileSet& fs) {
  std::string paths;
  for (size_t i = 0; i < fs.files.size(); ++i) {
    if (i) paths += ", ";
    paths += "'" + fs.files[i].path + "'";
  }
  return "FileSet([" + paths + "], size=" + format_size(fs.size) +
         (fs.files.size() > 1 ? ", stripe=" + format_size(fs.stripe) : std::string()) +
         ", direct=" + (fs.direct ? "True" : "False") + (fs.closed() ? ", closed" : "") + ")";
}

}  // namespace

void bind_io_engine(py::module_& m) {
  py::class_<FileSet, std::shared_ptr<FileSet>>(m, "FileSet", R"doc(
Files holding one logical byte range, striped RAID-0 style over one or more paths.
Made by IOEngine.open(); closed by close() or when the last reference (including requests in
flight) goes away.)doc")
      .def_property_readonly("paths",
                             [](const FileSet& fs) {
                               std::vector<std::string> p;
                               for (const auto& f : fs.files) p.push_back(f.path);
                               return p;
                             })
      .def_property_readonly("buffered_paths",
                             [](const FileSet& fs) {
                               std::vector<std::string> p;
                               for (const auto& f : fs.files) {
                                 if (f.fd_direct < 0) p.push_back(f.path);
                               }
                               return p;
                             },
                             "Paths whose filesystem refused O_DIRECT (they use the page cache).")
      .def_property_readonly("size", [](const FileSet& fs) { return fs.size; })
      .def_property_readonly("stripe", [](const FileSet& fs) { return fs.stripe; })
      .def_property_readonly("file_size", [](const FileSet& fs) { return fs.file_size; },
                             "Bytes of each file (the logical size split over the paths, in whole stripes).")
      .def_property_readonly("direct", [](const FileSet& fs) { return fs.direct; },
                             "True when every file has an O_DIRECT descriptor.")
      .def_property_readonly("logical_block_size", [](const FileSet& fs) { return fs.offset_align; },
                             "O_DIRECT alignment of file offsets and lengths (at least the page size).")
      .def_property_readonly("memory_alignment", [](const FileSet& fs) { return fs.mem_align; },
                             "O_DIRECT alignment of buffer addresses.")
      .def_property_readonly("closed", [](const FileSet& fs) { return fs.closed(); })
      .def("close", [](FileSet& fs, bool remove) {
            py::gil_scoped_release nogil;
            fs.close(remove);
          },
          py::arg("remove") = false,
          "Waits for this set's requests in flight, closes its files and, with remove=True, deletes "
          "them. Idempotent.")
      .def("__enter__", [](std::shared_ptr<FileSet> fs) { return fs; })
      .def("__exit__",
           [](FileSet& fs, py::args) {
             py::gil_scoped_release nogil;
             fs.close(false);
           })
      .def("__repr__", [](const FileSet& fs) { return fileset_repr(fs); });

  py::class_<PyRequest>(m, "Request", R"doc(
One read, write or sync in flight. wait() returns the bytes transferred or raises IOEngineError;
the request holds its buffer alive until it completes.)doc")
      .def("wait", &PyRequest::wait, py::arg("timeout") = py::none(),
           "Waits (without the GIL) and returns the bytes transferred; raises IOEngineError if the "
           "request failed and TimeoutError (without cancelling) if timeout seconds pass first.")
      .def("done", &PyRequest::done)
      .def_property_readonly("nbytes", [](const PyRequest& r) { return r.req()->nbytes(); })
      .def_property_readonly("offset", [](const PyRequest& r) { return r.req()->offset(); })
      .def_property_readonly("op", [](const PyRequest& r) { return std::string(io::op_name(r.req()->op())); })
      .def_property_readonly("chunks", [](const PyRequest& r) { return r.req()->num_chunks(); })
      .def_property_readonly("transferred", [](const PyRequest& r) { return r.req()->transferred(); },
                             "Bytes transferred so far.")
      .def("__repr__", [](const PyRequest& r) {
        const auto& q = *r.req();
        std::string state = !q.done() ? "in flight" : (q.failed() ? "failed" : "done");
        return "Request(" + std::string(io::op_name(q.op())) + ", offset=" + std::to_string(q.offset()) +
               ", nbytes=" + std::to_string(q.nbytes()) + ", " + state + ")";
      });

  py::class_<PyEngine>(m, "IOEngine", R"doc(
Asynchronous file I/O: io_uring (when built with liburing and allowed by the kernel) or a thread
pool. Requests are split into block_size chunks with at most queue_depth in flight.)doc")
      .def(py::init<const std::string&, int64_t, int64_t, int64_t, const std::string&>(),
           py::arg("backend") = "auto", py::arg("queue_depth") = 32, py::arg("block_size") = 1 << 20,
           py::arg("threads") = 0, py::arg("name") = "")
      .def_property_readonly("backend", [](PyEngine& e) { return e.eng().backend(); })
      .def_property_readonly("queue_depth", [](PyEngine& e) { return e.eng().queue_depth(); })
      .def_property_readonly("block_size", [](PyEngine& e) { return e.eng().block_size(); })
      .def_property_readonly("name", [](PyEngine& e) { return e.eng().name(); })
      .def_property_readonly("closed", [](PyEngine& e) { return e.eng().is_closed(); })
      .def("open", &PyEngine::open, py::arg("paths"), py::arg("size"), py::kw_only(),
           py::arg("stripe") = 1 << 20, py::arg("create") = true, py::arg("preallocate") = true,
           py::arg("direct") = true, py::arg("unlink") = false)
      .def(
          "read",
          [](PyEngine& e, std::shared_ptr<FileSet> fs, py::object offset, py::object buffer, py::object nbytes) {
            if (py::isinstance<py::int_>(buffer)) throw config_error("read: use read_ptr for raw addresses");
            return e.one(Op::Read, fs, offset, buffer, nbytes, py::none());
          },
          py::arg("fs"), py::arg("offset"), py::arg("buffer"), py::arg("nbytes") = py::none())
      .def(
          "write",
          [](PyEngine& e, std::shared_ptr<FileSet> fs, py::object offset, py::object buffer, py::object nbytes) {
            if (py::isinstance<py::int_>(buffer)) throw config_error("write: use write_ptr for raw addresses");
            return e.one(Op::Write, fs, offset, buffer, nbytes, py::none());
          },
          py::arg("fs"), py::arg("offset"), py::arg("buffer"), py::arg("nbytes") = py::none())
      .def(
          "read_ptr",
          [](PyEngine& e, std::shared_ptr<FileSet> fs, py::object offset, py::int_ address, py::object nbytes,
             py::object keepalive) { return e.one(Op::Read, fs, offset, address, nbytes, keepalive); },
          py::arg("fs"), py::arg("offset"), py::arg("address"), py::arg("nbytes"),
          py::arg("keepalive") = py::none())
      .def(
          "write_ptr",
          [](PyEngine& e, std::shared_ptr<FileSet> fs, py::object offset, py::int_ address, py::object nbytes,
             py::object keepalive) { return e.one(Op::Write, fs, offset, address, nbytes, keepalive); },
          py::arg("fs"), py::arg("offset"), py::arg("address"), py::arg("nbytes"),
          py::arg("keepalive") = py::none())
      .def("submit", &PyEngine::submit, py::arg("ops"))
      .def("sync", &PyEngine::sync, py::arg("fs"))
      .def("register_buffers", &PyEngine::register_buffers, py::arg("buffers"))
      .def("unregister_buffers", &PyEngine::unregister_buffers)
      .def("inject_fault", &PyEngine::inject_fault, py::arg("op") = "any", py::arg("errno") = 5,
           py::arg("path_contains") = "", py::arg("after") = 0, py::arg("count") = 1,
           py::arg("mode") = "error")
      .def("clear_faults", [](PyEngine& e) { e.eng().clear_faults(); })
      .def("stats", &PyEngine::stats)
      .def("close", &PyEngine::close)
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](PyEngine& e, py::args) { e.close(); })
      .def("__repr__", [](PyEngine& e) {
        auto& g = e.eng();
        return "IOEngine(backend='" + g.backend() + "', queue_depth=" + std::to_string(g.queue_depth()) +
               ", block_size=" + format_size(g.block_size()) + (g.name().empty() ? "" : ", name='" + g.name() + "'") +
               (g.is_closed() ? ", closed" : "") + ")";
      });

  m.def(
      "io_uring_status",
      []() {
        static std::optional<std::pair<bool, std::string>> cached;
        if (!cached) {
          try {
            py::gil_scoped_release nogil;
            auto eng = Engine::create("io_uring", 2, 4096, 0, "probe");
            eng->close();
            cached = std::make_pair(true, std::string("available"));
          } catch (const NativeError& err) {
            std::string why = err.what();
            const std::string prefix = "IOEngine: io_uring is not available: ";
            if (why.rfind(prefix, 0) == 0) why = why.substr(prefix.size());
            cached = std::make_pair(false, why);
          }
        }
        return *cached;
      },
      "(available, reason): whether the io_uring backend can be used here, and why not.");
}

}  // namespace tierrt
