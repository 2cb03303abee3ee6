// The CUDA extension module fused_opt._C_cuda: importing it registers the CUDA kernels for the
// ops (the schemas themselves live in fused_opt/ops.py; see fused_opt/registration.h), and it
// provides table_step, the launch from a cached group table (fused_opt/tables.py). The CPU
// module, fused_opt._C, is defined in cpu/tables.cpp.
#include "fused_opt/registration.h"
#include "fused_opt/table_binding.h"

PYBIND11_MODULE(_C_cuda, m) {
  try {
    fused_opt::check_cuda_driver();
    fused_opt::register_kernels(c10::DispatchKey::CUDA, __FILE__, fused_opt::register_cuda_kernels);
  } catch (const std::runtime_error& e) {
    throw pybind11::import_error(e.what());
  }
  fused_opt::mta::bind_table_step(m, "table_step", &fused_opt::mta::cuda_table_step);
}
