// The kernels are registered for the ops when their module is imported, not by static
// initialisers (TORCH_LIBRARY_IMPL): an extension built against other schemas (a stale build
// after an upgrade) then fails its import with an ImportError that names the mismatch, and the
// package falls back to another backend, instead of the process aborting while the library loads.
#pragma once

#include <torch/library.h>

#include <memory>
#include <stdexcept>
#include <string>

namespace fused_opt {

void register_cpu_kernels(torch::Library& m);       // csrc/cpu/ops_cpu.cpp
void register_cuda_sim_kernels(torch::Library& m);  // csrc/cpu/cuda_sim.cpp
void register_cuda_kernels(torch::Library& m);      // csrc/cuda/ops_cuda.cu
void check_cuda_driver();                           // csrc/cuda/ops_cuda.cu: throws std::runtime_error

// Registers add(library) for dispatch key `key`, for the life of the process. On failure the
// registrations made so far are undone and std::runtime_error says why (without a backtrace).
template <typename Add>
void register_kernels(c10::DispatchKey key, const char* file, Add add) {
  try {
    auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, "fused_opt", key, file, __LINE__);
    add(*lib);
    lib.release();  // kept: dropping the Library would unregister its kernels
  } catch (const c10::Error& e) {
    throw std::runtime_error(std::string("fused_opt: registering the kernels failed (built for other op "
                                         "schemas or another torch?): ") + e.what_without_backtrace());
  }
}

}  // namespace fused_opt
