// Host helpers of the CPU kernels (declared in launch.h): packing a launch, reading the per-step
// scalars, advancing step counters, and choosing the kernels of this CPU's capability.
#include <cstdlib>
#include <cstring>

#include "launch.h"

namespace fused_opt::cpu {

void add_tensor(Launch& launch, const Pointers& ptr, int64_t numel) {
  const auto index = static_cast<int32_t>(launch.tensors.size());
  launch.tensors.push_back({ptr, numel, 0.0});
  for (int64_t b = 0; b < numel; b += kChunk) {
    launch.chunks.push_back({index, b, std::min(numel, b + kChunk)});
  }
  launch.total_numel += numel;
}

StepScalars read_scalars(double lr, const std::optional<at::Tensor>& lr_tensor,
                         const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  StepScalars s;
  s.skip = found_inf.has_value() && found_inf->item<double>() != 0.0;
  s.lr = lr_tensor.has_value() ? lr_tensor->item<double>() : lr;
  if (grad_scale.has_value()) s.inv_grad_scale = 1.0 / grad_scale->item<double>();
  return s;
}

std::vector<double> advance_steps(at::TensorList steps) {
  std::vector<double> out;
  out.reserve(steps.size());
  for (const at::Tensor& s : steps) {
    if (s.scalar_type() == at::kFloat) {
      out.push_back(*s.data_ptr<float>() += 1.0f);
    } else {
      out.push_back(*s.data_ptr<double>() += 1.0);
    }
  }
  return out;
}

namespace {
bool use_avx2() {
  static const bool yes = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    const char* forced = std::getenv("ATEN_CPU_CAPABILITY");  // torch's own override
    if (forced && std::strcmp(forced, "default") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
  }();
  return yes;
}
}  // namespace

void adam(const Launch& launch, const AdamOptions& o) { use_avx2() ? AVX2::adam(launch, o) : DEFAULT::adam(launch, o); }
void rmsprop(const Launch& launch, const RMSpropOptions& o) {
  use_avx2() ? AVX2::rmsprop(launch, o) : DEFAULT::rmsprop(launch, o);
}
void sgd(const Launch& launch, const SGDOptions& o) { use_avx2() ? AVX2::sgd(launch, o) : DEFAULT::sgd(launch, o); }

}  // namespace fused_opt::cpu
