// Host helpers of the CPU kernels (declared in launch.h): packing a launch, reading the per-step
// scalars, advancing step counters, and choosing the kernels of this CPU's capability.
#include <ATen/Version.h>

#include <atomic>
#include <string>

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
// The widest kernels this CPU can run, capped by torch's own choice (so ATEN_CPU_CAPABILITY=avx2
// or =default picks ours as it picks torch's).
Kernels best_kernels() {
#ifdef FUSED_OPT_X86_VARIANTS
  const std::string torch_choice = at::get_cpu_capability();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (torch_choice == "AVX512" && avx512) return Kernels::AVX512;
  if ((torch_choice == "AVX512" || torch_choice == "AVX2") && avx2) return Kernels::AVX2;
#endif
  return Kernels::DEFAULT;
}

std::atomic<Kernels>& chosen() {
  static std::atomic<Kernels> kernels{best_cpu_kernels()};
  return kernels;
}
}  // namespace

Kernels best_cpu_kernels() {
  static const Kernels best = best_kernels();
  return best;
}

Kernels cpu_kernels() { return chosen().load(std::memory_order_relaxed); }

void use_cpu_kernels(Kernels kernels) {
  TORCH_CHECK(kernels <= best_cpu_kernels(), "fused_opt: the ", kernels_name(kernels),
              " kernels cannot run here (the widest this CPU and torch's CPU capability allow: ",
              kernels_name(best_cpu_kernels()), ")");
  chosen().store(kernels);
}

const char* kernels_name(Kernels kernels) {
  switch (kernels) {
    case Kernels::AVX512: return "AVX512";
    case Kernels::AVX2: return "AVX2";
    default: return "DEFAULT";
  }
}

#define FUSED_OPT_CALL_CPU_KERNEL(NAME, OPTIONS)                      \
  void NAME(const Launch& launch, const OPTIONS& o) {                 \
    switch (cpu_kernels()) {                                          \
      case Kernels::AVX512: return AVX512::NAME(launch, o);           \
      case Kernels::AVX2: return AVX2::NAME(launch, o);               \
      default: return DEFAULT::NAME(launch, o);                       \
    }                                                                 \
  }
FUSED_OPT_CALL_CPU_KERNEL(adam, AdamOptions)
FUSED_OPT_CALL_CPU_KERNEL(rmsprop, RMSpropOptions)
FUSED_OPT_CALL_CPU_KERNEL(sgd, SGDOptions)
#undef FUSED_OPT_CALL_CPU_KERNEL

}  // namespace fused_opt::cpu
