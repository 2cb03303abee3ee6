// CUDA implementations of fused_opt::adam_, rmsprop_ and sgd_: the shared multi-tensor traversal
// (fused_opt/multi_tensor.h) launched on the current stream, many tensors per launch.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <stdexcept>
#include <string>

#include "fused_opt/mta_ops.h"
#include "fused_opt/registration.h"

namespace fused_opt::mta {
namespace {

template <typename scalar_t, bool Master, typename Family>
__global__ void __launch_bounds__(kThreads) multi_tensor_kernel(const Meta meta, const Scalars s, const Family family) {
  process_block<scalar_t, Master>(meta, s, family, blockIdx.x, threadIdx.x, blockDim.x);
}

__global__ void __launch_bounds__(kCounterThreads) advance_counters_kernel(const Counters counters) {
  advance_counter(counters, blockIdx.x, threadIdx.x, blockDim.x);
}

struct CudaRunner {
  using Guard = c10::cuda::CUDAGuard;  // the params' device is current for the whole op
  static constexpr Limits kLimits{};   // launches as full as Meta allows

  static at::Device check_device(const char* op, at::TensorList params) {
    const at::Device device = params[0].device();
    TORCH_CHECK(device.is_cuda(), op, ": params[0] is on ", device, ", expected a CUDA device");
    return device;
  }

  template <typename scalar_t, bool Master, typename Family>
  static void launch(const Meta& meta, int blocks, const Scalars& s, const Family& family) {
    multi_tensor_kernel<scalar_t, Master><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(meta, s, family);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void advance(const Counters& counters) {
    const int blocks = (counters.n + kCounterThreads - 1) / kCounterThreads;
    advance_counters_kernel<<<blocks, kCounterThreads, 0, at::cuda::getCurrentCUDAStream()>>>(counters);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

void cuda_table_step(const std::string& family, const TableArgs& a, const FamilyOptions& o) {
  table_step<CudaRunner>(family, a, o);
}

}  // namespace fused_opt::mta

void fused_opt::check_cuda_driver() {
  // Kernel arguments over 4 KB (Meta) need a driver for CUDA 12.1 or later; an older one would
  // refuse every launch. No driver at all is fine: then nothing launches.
  int version = 0;
  if (cudaDriverGetVersion(&version) != cudaSuccess || version == 0 || version >= 12010) return;
  throw std::runtime_error("fused_opt: the CUDA kernels need an NVIDIA driver for CUDA 12.1 or later (R530+); this one "
                           "supports CUDA " + std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10) +
                           ": update the driver, or use backend=\"triton\"");
}

void fused_opt::register_cuda_kernels(torch::Library& m) {
  using Cuda = mta::Ops<mta::CudaRunner>;
  m.impl("adam_", TORCH_FN(&Cuda::adam));
  m.impl("rmsprop_", TORCH_FN(&Cuda::rmsprop));
  m.impl("sgd_", TORCH_FN(&Cuda::sgd));
}
