// dgkernels._C: the library that owns the `dgkernels::` operator namespace.
// Each op family adds its schemas with TORCH_LIBRARY_FRAGMENT and its kernels with
// TORCH_LIBRARY_IMPL(dgkernels, CPU/CUDA, m) in csrc/<family>/{cpu.cpp,cuda.cu}.
// No pybind11 here on purpose: ops are reached through torch.ops.dgkernels.*, and leaving out
// torch/extension.h keeps every translation unit cheap to compile.
#include <Python.h>
#include <torch/library.h>

#include <string>

namespace dgkernels {

std::string build_info() {
#ifdef DGKERNELS_WITH_CUDA
  return "cpu,cuda";
#else
  return "cpu";
#endif
}

}  // namespace dgkernels

TORCH_LIBRARY(dgkernels, m) {
  m.def("build_info() -> str", &dgkernels::build_info);
}

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "dgkernels compiled ops (see torch.ops.dgkernels)", -1, nullptr};
  return PyModule_Create(&module_def);
}
