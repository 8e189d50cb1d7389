// Python bindings of HostArena and ArenaBuffer (tierrt._native.HostArena, ArenaBuffer, numa_nodes).
//
// An ArenaBuffer exports the buffer protocol (1-D, unsigned char, writable), so numpy.frombuffer and
// torch.frombuffer alias arena memory without a copy. Both keep a reference to the ArenaBuffer for as
// long as the array / tensor storage lives, and the range goes back to the arena only when the
// ArenaBuffer object is destroyed: memory is never reused while anything still views it.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include "binding_utils.hpp"
#include "host_arena.hpp"

namespace py = pybind11;

namespace tierrt {

py::dict allocator_stats_dict(const AllocatorStats& s);  // allocator_bindings.cpp

namespace {

std::unique_ptr<ArenaBuffer> arena_alloc(const std::shared_ptr<HostArena>& arena, uint64_t nbytes,
                                         bool from_top = false) {
  const uint64_t offset = arena->allocator().alloc(nbytes, from_top);
  return std::make_unique<ArenaBuffer>(arena, offset, nbytes, true);
}

}  // namespace

void bind_host_arena(py::module_& m) {
  py::class_<ArenaBuffer>(m, "ArenaBuffer", py::buffer_protocol(), R"doc(
A range of a HostArena, exported through the buffer protocol (1-D, unsigned char, writable).

``numpy.frombuffer(buf, dtype=numpy.uint8)`` and ``torch.frombuffer(buf, dtype=torch.uint8)`` alias the
arena memory without copying and keep ``buf`` alive. An owning buffer (from ``HostArena.alloc``) gives
its range back to the arena when the object is destroyed, i.e. when the last reference (including
the ones held by arrays and tensors viewing it) is gone. Views (``HostArena.buffer_at``) own nothing.
)doc")
      .def_buffer([](ArenaBuffer& b) {
        return py::buffer_info(b.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.nbytes())}, {static_cast<py::ssize_t>(1)}, false);
      })
      .def_property_readonly(
          "address", [](const ArenaBuffer& b) { return reinterpret_cast<uintptr_t>(b.data()); },
          "Address of the first byte.")
      .def_property_readonly("offset", &ArenaBuffer::offset, "Offset inside the arena.")
      .def_property_readonly("nbytes", &ArenaBuffer::nbytes, "Length in bytes (as requested).")
      .def_property_readonly("owning", &ArenaBuffer::owning,
                             "True when the range returns to the arena as this object is destroyed.")
      .def_property_readonly(
          "arena_name", [](const ArenaBuffer& b) { return b.arena()->name(); }, "Name of the arena's tier.")
      .def_property_readonly(
          "arena", [](const ArenaBuffer& b) { return b.arena(); }, "The native arena holding this range.")
      .def("__len__", [](const ArenaBuffer& b) { return b.nbytes(); })
      .def("__repr__", [](const ArenaBuffer& b) {
        return std::string("<tierrt._native.ArenaBuffer ") + (b.owning() ? "" : "view ") + format_size(b.nbytes()) +
               " at offset " + std::to_string(b.offset()) + " of '" + b.arena()->name() + "'>";
      });

  py::class_<HostArena, std::shared_ptr<HostArena>>(m, "HostArena", R"doc(
One mmap'd, NUMA-placed, huge-page-advised, populated and locked region of host memory, with a
best-fit allocator over it. It never grows. Prefer the documented wrapper tierrt.arena.HostArena.

policy: "default" (no nodes), "bind", "interleave", "preferred" (one node, or several with Linux 5.15+),
"weighted" (contiguous ranges bound to each node in proportion to ``weights``, on 2MiB boundaries).
)doc")
      .def(py::init([](py::handle nbytes, std::optional<std::vector<int>> nodes, std::string policy,
                       std::optional<std::vector<double>> weights, bool hugepages, bool lock, bool populate,
                       py::handle alignment, std::string name, int populate_threads) {
             HostArenaOptions options;
             options.nbytes = size_arg(nbytes, "nbytes");
             options.nodes = nodes.value_or(std::vector<int>{});
             options.policy = std::move(policy);
             options.weights = weights.value_or(std::vector<double>{});
             options.hugepages = hugepages;
             options.lock = lock;
             options.populate = populate;
             options.alignment = size_arg(alignment, "alignment");
             options.name = std::move(name);
             options.populate_threads = populate_threads;
             py::gil_scoped_release release;
             return HostArena::create(options);
           }),
           py::arg("nbytes"), py::arg("nodes") = py::none(), py::arg("policy") = "default",
           py::arg("weights") = py::none(), py::arg("hugepages") = true, py::arg("lock") = true,
           py::arg("populate") = true, py::arg("alignment") = 4096, py::arg("name") = "dram",
           py::arg("populate_threads") = 0)
      .def(
          "alloc",
          [](const std::shared_ptr<HostArena>& self, py::handle nbytes, bool from_top) {
            return arena_alloc(self, size_arg(nbytes, "nbytes"), from_top);
          },
          py::arg("nbytes"), py::arg("from_top") = false,
          "A new owning ArenaBuffer of nbytes. TierCapacityError when it does not fit, ConfigError for 0.")
      .def(
          "try_alloc",
          [](const std::shared_ptr<HostArena>& self, py::handle nbytes,
             bool from_top) -> std::unique_ptr<ArenaBuffer> {
            const auto offset = self->allocator().try_alloc(size_arg(nbytes, "nbytes"), from_top);
            if (!offset) return nullptr;
            return std::make_unique<ArenaBuffer>(self, *offset, size_arg(nbytes, "nbytes"), true);
          },
          py::arg("nbytes"), py::arg("from_top") = false,
          "Like alloc(), but returns None when the request does not fit (from_top: see Allocator).")
      .def(
          "buffer_at",
          [](const std::shared_ptr<HostArena>& self, py::handle offset, py::handle nbytes) {
            const uint64_t off = size_arg(offset, "offset");
            const uint64_t len = size_arg(nbytes, "nbytes");
            self->check_range(off, len, "buffer_at range");
            return std::make_unique<ArenaBuffer>(self, off, len, false);
          },
          py::arg("offset"), py::arg("nbytes"),
          "A non-owning view of [offset, offset + nbytes) (for statically planned layouts); keeps the "
          "arena alive; bounds-checked.")
      .def_property_readonly(
          "address", [](const HostArena& a) { return reinterpret_cast<uintptr_t>(a.base()); })
      .def_property_readonly("nbytes", &HostArena::nbytes)
      .def_property_readonly("mapped_bytes", &HostArena::mapped_bytes)
      .def_property_readonly("name", &HostArena::name)
      .def_property_readonly("alignment", [](const HostArena& a) { return a.allocator().alignment(); })
      .def_property_readonly("locked", &HostArena::locked)
      .def_property_readonly("lock_error", &HostArena::lock_error)
      .def_property_readonly("hugepages", &HostArena::hugepages)
      .def_property_readonly("populated", &HostArena::populated)
      .def_property_readonly("policy", &HostArena::policy)
      .def_property_readonly("nodes", &HostArena::nodes)
      .def_property_readonly("create_seconds", &HostArena::create_seconds)
      .def_property_readonly(
          "node_ranges",
          [](const HostArena& a) {
            py::list out;
            for (const auto& r : a.node_ranges()) out.append(py::make_tuple(r.offset, r.nbytes, r.node));
            return out;
          },
          "(offset, nbytes, node) of each range bound by mbind; node -1 when bound to several.")
      .def(
          "stats",
          [](const HostArena& a) {
            py::dict d = allocator_stats_dict(a.allocator().stats());
            d["reserved"] = a.nbytes();
            d["locked"] = a.locked();
            d["hugepages"] = a.hugepages();
            d["policy"] = a.policy();
            d["nodes"] = a.nodes();
            d["name"] = a.name();
            return d;
          },
          "Allocator statistics plus reserved, locked, hugepages, policy, nodes, name.")
      .def("reset_peak", [](HostArena& a) { a.allocator().reset_peak(); })
      .def("free_extents", [](const HostArena& a) { return a.allocator().free_extents(); })
      .def("live_allocations", [](const HostArena& a) { return a.allocator().live_allocations(); })
      .def(
          "page_nodes",
          [](const HostArena& a, py::handle offset, std::optional<py::object> nbytes, size_t max_pages) {
            const uint64_t off = size_arg(offset, "offset");
            uint64_t len = 0;
            if (nbytes && !nbytes->is_none()) {
              len = size_arg(*nbytes, "nbytes");
            } else {
              a.check_range(off, 0, "page_nodes offset");
              len = a.nbytes() - off;
            }
            py::gil_scoped_release release;
            return a.page_nodes(off, len, max_pages);
          },
          py::arg("offset") = 0, py::arg("nbytes") = py::none(), py::arg("max_pages") = 64,
          "NUMA node of up to max_pages pages sampled evenly over the range (move_pages(2) query); "
          "a negative entry is -errno for that page.")
      .def(
          "policy_at", [](const HostArena& a, py::handle offset) { return a.policy_at(size_arg(offset, "offset")); },
          py::arg("offset") = 0, "(mode, nodes) of the kernel's memory policy at offset (get_mempolicy(2)).")
      .def("hugepage_bytes", &HostArena::hugepage_bytes, py::call_guard<py::gil_scoped_release>(),
           "Bytes of the region backed by transparent huge pages (from /proc/self/smaps; a few ms).")
      .def("cuda_register", &HostArena::cuda_register, py::arg("library") = "",
           py::call_guard<py::gil_scoped_release>(),
           "Register the region with CUDA as pinned memory through libcudart at `library` (path or "
           "soname; empty: the one already loaded). Idempotent.")
      .def("cuda_unregister", &HostArena::cuda_unregister, py::call_guard<py::gil_scoped_release>(),
           "Undo cuda_register(); False when not registered. Done automatically before unmapping.")
      .def_property_readonly("cuda_registered", &HostArena::cuda_registered)
      .def("__repr__", [](const HostArena& a) {
        const auto s = a.allocator().stats();
        return "<tierrt._native.HostArena '" + a.name() + "' " + format_size(s.in_use) + " of " +
               format_size(a.nbytes()) + " in use, policy " + a.policy() + ">";
      });

  m.def(
      "_arena_stress",
      [](const std::shared_ptr<HostArena>& arena, int threads, int iterations, uint64_t max_bytes, uint64_t seed) {
        // Test hook: C++ threads allocate, fill with their own tag, verify and free concurrently. Two
        // threads handed overlapping ranges would overwrite each other's tags. Returns
        // (corrupted ranges, failed allocations).
        std::atomic<uint64_t> corrupted{0}, failed{0};
        {
          py::gil_scoped_release release;
          auto worker = [&](int t) {
            std::mt19937_64 rng(seed * 7919 + static_cast<uint64_t>(t));
            const uint8_t tag = static_cast<uint8_t>(t + 1);
            std::vector<std::pair<uint64_t, uint64_t>> mine;
            auto release_one = [&](size_t i) {
              const auto [off, n] = mine[i];
              const uint8_t* p = arena->base() + off;
              for (uint64_t k = 0; k < n; ++k) {
                if (p[k] != tag) {
                  ++corrupted;
                  break;
                }
              }
              arena->allocator().free(off);
              mine[i] = mine.back();
              mine.pop_back();
            };
            for (int it = 0; it < iterations; ++it) {
              if (mine.empty() || (mine.size() < 16 && rng() % 2 == 0)) {
                const uint64_t n = 1 + rng() % max_bytes;
                const auto off = arena->allocator().try_alloc(n);
                if (!off) {
                  ++failed;
                  continue;
                }
                std::memset(arena->base() + *off, tag, n);
                mine.emplace_back(*off, n);
              } else {
                release_one(rng() % mine.size());
              }
            }
            while (!mine.empty()) release_one(mine.size() - 1);
          };
          std::vector<std::thread> pool;
          for (int t = 0; t < threads; ++t) pool.emplace_back(worker, t);
          for (auto& th : pool) th.join();
        }
        return py::make_tuple(corrupted.load(), failed.load());
      },
      py::arg("arena"), py::arg("threads"), py::arg("iterations"), py::arg("max_bytes"), py::arg("seed") = 0);

  m.def("numa_nodes", &numa_memory_nodes,
        "NUMA nodes with memory that this process may allocate on (has_memory and Mems_allowed).");
  m.def("numa_existing_nodes", &numa_existing_nodes, "NUMA nodes present on this machine.");
}

}  // namespace tierrt
