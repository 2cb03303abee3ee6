// An importable Python module whose only job is to load the op registrations of this library
// (the schemas themselves live in fused_opt/ops.py). Compiled once per extension.
#include <Python.h>

#ifndef FUSED_OPT_MODULE
#define FUSED_OPT_MODULE _C
#endif
#define FO_CAT(a, b) a##b
#define FO_INIT(name) FO_CAT(PyInit_, name)
#define FO_STR2(x) #x
#define FO_STR(x) FO_STR2(x)

extern "C" PyMODINIT_FUNC FO_INIT(FUSED_OPT_MODULE)(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, FO_STR(FUSED_OPT_MODULE), nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
