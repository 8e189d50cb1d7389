// Python bindings of the offset allocator and the static planner (tierrt._native.Allocator,
// tierrt._native.plan_static).
//
// alloc/free are O(log n) and take well under a microsecond, so they keep the GIL (releasing it would
// cost more than the call); the allocator's own mutex makes it safe against C++ threads.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>

#include "allocator.hpp"
#include "binding_utils.hpp"

namespace py = pybind11;

namespace tierrt {

py::dict allocator_stats_dict(const AllocatorStats& s) {
  py::dict d;
  d["capacity"] = s.capacity;
  d["alignment"] = s.alignment;
  d["in_use"] = s.in_use;
  d["peak_in_use"] = s.peak_in_use;
  d["high_water"] = s.high_water;
  d["free"] = s.free;
  d["largest_free"] = s.largest_free;
  d["free_extents"] = s.free_extents;
  d["fragmentation"] = s.fragmentation;
  d["allocations"] = s.allocations;
  d["total_allocs"] = s.total_allocs;
  d["total_frees"] = s.total_frees;
  return d;
}

void bind_allocator(py::module_& m) {
  py::class_<Allocator, std::shared_ptr<Allocator>>(m, "Allocator", R"doc(
Best-fit offset allocator over [0, capacity), with immediate coalescing; thread-safe.

Manages offsets, not memory: tierrt uses it inside host arenas and for extents of NVMe swap files.
Sizes are rounded up to ``alignment`` (a power of two) and nothing else.

>>> a = Allocator(1 << 20, 4096, "dram")
>>> off = a.alloc(5000)          # 8192 bytes reserved at offset 0
>>> a.size_of(off)
8192
>>> a.free(off)
)doc")
      .def(py::init([](py::handle capacity, py::handle alignment, std::string name) {
             return std::make_shared<Allocator>(size_arg(capacity, "capacity"),
                                                size_arg(alignment, "alignment"), std::move(name));
           }),
           py::arg("capacity"), py::arg("alignment") = 4096, py::arg("name") = "")
      .def(
          "alloc",
          [](Allocator& a, py::handle nbytes, bool from_top) {
            return a.alloc(size_arg(nbytes, "nbytes"), from_top);
          },
          py::arg("nbytes"), py::arg("from_top") = false,
          "Offset of a new range of nbytes (rounded up to the alignment). Raises TierCapacityError "
          "(tier, requested, free, largest_free, budget) when it does not fit, ConfigError for 0.")
      .def(
          "try_alloc",
          [](Allocator& a, py::handle nbytes, bool from_top) {
            return a.try_alloc(size_arg(nbytes, "nbytes"), from_top);
          },
          py::arg("nbytes"), py::arg("from_top") = false,
          "Like alloc(), but returns None when the request does not fit. from_top=True takes the "
          "highest-offset best fit (short-lived buffers at the top, long-lived ones at the bottom).")
      .def(
          "free", [](Allocator& a, py::handle offset) { a.free(size_arg(offset, "offset")); },
          py::arg("offset"),
          "Return the allocation at offset. ConfigError when none starts there (double free).")
      .def(
          "size_of", [](const Allocator& a, py::handle offset) { return a.size_of(size_arg(offset, "offset")); },
          py::arg("offset"), "Bytes reserved by the allocation at offset (rounded to the alignment).")
      .def_property_readonly("capacity", &Allocator::capacity)
      .def_property_readonly("alignment", &Allocator::alignment)
      .def_property_readonly("name", &Allocator::name)
      .def(
          "stats", [](const Allocator& a) { return allocator_stats_dict(a.stats()); },
          "dict: capacity, alignment, in_use, peak_in_use, high_water, free, largest_free, free_extents, "
          "fragmentation, allocations, total_allocs, total_frees.")
      .def("reset_peak", &Allocator::reset_peak,
           "Restart peak_in_use and high_water from the current state.")
      .def("free_extents", &Allocator::free_extents, "Free extents as sorted (offset, size) pairs.")
      .def("live_allocations", &Allocator::live_allocations,
           "Live allocations as sorted (offset, reserved size) pairs.")
      .def("__repr__", [](const Allocator& a) {
        const auto s = a.stats();
        return "<tierrt._native.Allocator '" + a.name() + "' " + format_size(s.in_use) + " of " +
               format_size(s.capacity) + " in use, " + std::to_string(s.allocations) + " allocations>";
      });

  m.def(
      "plan_static",
      [](const std::vector<py::handle>& sizes, const std::vector<int64_t>& first_use,
         const std::vector<int64_t>& last_use, py::handle alignment) {
        std::vector<uint64_t> nbytes;
        nbytes.reserve(sizes.size());
        for (const auto& s : sizes) nbytes.push_back(size_arg(s, "plan_static: a size"));
        const uint64_t align = size_arg(alignment, "alignment");
        std::pair<std::vector<uint64_t>, uint64_t> result;
        {
          py::gil_scoped_release release;
          result = plan_static(nbytes, first_use, last_use, align);
        }
        return py::make_tuple(py::cast(result.first), result.second);
      },
      py::arg("sizes"), py::arg("first_use"), py::arg("last_use"), py::arg("alignment") = 4096,
      R"doc(
Assign offsets once to buffers with known lifetimes so that buffers alive at the same time never
overlap. Lifetimes are inclusive time steps [first_use[i], last_use[i]]; sizes are rounded up to the
alignment. Returns (offsets, peak) where peak is the highest end offset: the arena size the plan needs.

>>> offsets, peak = plan_static([4096, 4096, 8192], [0, 1, 2], [0, 1, 2])
>>> peak                 # no two lifetimes overlap: everything at offset 0
8192
)doc");
}

}  // namespace tierrt
