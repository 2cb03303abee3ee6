// The CUDA extension module fused_opt._C_cuda: importing it registers the CUDA kernels for the
// ops (the schemas themselves live in fused_opt/ops.py; see fused_opt/registration.h). The CPU
// module, fused_opt._C, is defined in cpu/tables.cpp.
#include <Python.h>

#include "fused_opt/registration.h"

extern "C" PyMODINIT_FUNC PyInit__C_cuda(void) {
  try {
    fused_opt::register_kernels(c10::DispatchKey::CUDA, __FILE__, fused_opt::register_cuda_kernels);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ImportError, e.what());
    return nullptr;
  }
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
