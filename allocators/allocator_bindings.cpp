// Placeholder so that the skeleton builds; replaced by the component's real bindings.
#include <pybind11/pybind11.h>
namespace py = pybind11;
namespace tierrt {
void bind_allocator(py::module_& m) {}
}  // namespace tierrt
