// What the CPU kernels receive: raw pointers per tensor, the chunks to spread over threads, and
// the per-call scalars. Built (after every check) by ops_cpu.cpp; consumed by kernels.h, which is
// compiled once per CPU capability (kernels_default.cpp, kernels_avx2.cpp, kernels_avx512.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <array>
#include <optional>
#include <cstdint>
#include <vector>

#include "fused_opt/math.h"

// The AVX2 and AVX-512 kernel files are compiled for their targets with `#pragma GCC target`,
// which only GCC honours: under clang (macOS, or CC=clang) they compile as generic code and the
// DEFAULT kernels run, correct but unvectorised on x86.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FUSED_OPT_X86_VARIANTS 1
#endif

namespace fused_opt::cpu {

// Slot order of every family: 0 param, 1 grad (read only), 2.. state tensors (null if unused).
constexpr int kSlots = 5;
// With fp32 master weights (16-bit params only) a sixth pointer, the master copy, holds the
// value the math runs on; the states are then float32 and the param is only written.
constexpr int kMaster = 5;
constexpr int kPointers = 6;
using Pointers = std::array<void*, kPointers>;

struct TensorJob {
  Pointers ptr;
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
  int slot_mask = 0;  // bit k set: slot k is in use (its list is not empty); bit kMaster: master weights
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
FUSED_OPT_DECLARE_CPU_KERNELS(AVX512)

// Host helpers shared by the ops (ops_cpu.cpp) and the cached group tables (tables.cpp);
// defined in host.cpp.

// Elements per unit of work handed to a thread: big enough to amortise the hand-out, small enough
// that many small tensors and a few huge ones spread evenly.
constexpr int64_t kChunk = 1 << 15;

// Appends one tensor (its slot pointers and size) and its chunks to a launch.
void add_tensor(Launch& launch, const Pointers& ptr, int64_t numel);

// The per-step scalars as host values; `skip` when found_inf says this step must not happen.
struct StepScalars {
  double lr = 0.0;
  double inv_grad_scale = 1.0;
  bool skip = false;
};
StepScalars read_scalars(double lr, const std::optional<at::Tensor>& lr_tensor,
                         const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf);

// Adds one to each (CPU, float32/float64, already checked) step counter; returns the new values.
std::vector<double> advance_steps(at::TensorList steps);

// Which compiled kernels run: the widest this CPU has and torch itself uses (cpu_kernels() starts
// as best_cpu_kernels()); tests switch with use_cpu_kernels() to run every variant on one machine.
enum class Kernels { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };
Kernels cpu_kernels();
Kernels best_cpu_kernels();
void use_cpu_kernels(Kernels kernels);  // refuses kernels wider than best_cpu_kernels()
const char* kernels_name(Kernels kernels);

// The kernels of the variant cpu_kernels() names.
void adam(const Launch& launch, const AdamOptions& o);
void rmsprop(const Launch& launch, const RMSpropOptions& o);
void sgd(const Launch& launch, const SGDOptions& o);

}  // namespace fused_opt::cpu
