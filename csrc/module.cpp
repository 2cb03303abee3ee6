// The CUDA extension module fused_opt._C_cuda: importing it loads the CUDA kernels' registrations
// for the ops (the schemas themselves live in fused_opt/ops.py). The CPU module, fused_opt._C, is
// defined in cpu/tables.cpp.
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C_cuda(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
