// What the CPU kernels receive: raw pointers per tensor, the chunks to spread over threads, and
// the per-call scalars. Built (after every check) by ops_cpu.cpp; consumed by kernels.h, which is
// compiled once per CPU capability (kernels_default.cpp, kernels_avx2.cpp).
#pragma once

#include <c10/core/ScalarType.h>

#include <array>
#include <cstdint>
#include <vector>

#include "fused_opt/math.h"

namespace fused_opt::cpu {

// Slot order of every family: 0 param, 1 grad (read only), 2.. state tensors (null if unused).
constexpr int kSlots = 5;

struct TensorJob {
  std::array<void*, kSlots> ptr;
  int64_t numel;
  double step;  // the step this update performs (already incremented); Adam's bias correction
};

struct Chunk {
  int32_t tensor;
  int64_t begin, end;
};

struct Launch {
  c10::ScalarType dtype;
  std::vector<TensorJob> tensors;
  std::vector<Chunk> chunks;
  int64_t total_numel = 0;
  int slot_mask = 0;  // bit k set: slot k is in use (its list is not empty)
  double lr = 0.0;
  double inv_grad_scale = 1.0;
};

#define FUSED_OPT_DECLARE_CPU_KERNELS(NS)                  \
  namespace NS {                                           \
  void adam(const Launch& launch, const AdamOptions& o);   \
  void rmsprop(const Launch& launch, const RMSpropOptions& o); \
  void sgd(const Launch& launch, const SGDOptions& o);     \
  }

FUSED_OPT_DECLARE_CPU_KERNELS(DEFAULT)
FUSED_OPT_DECLARE_CPU_KERNELS(AVX2)

}  // namespace fused_opt::cpu
