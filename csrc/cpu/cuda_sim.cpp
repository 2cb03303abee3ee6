// Runs the CUDA kernels' traversal (fused_opt/multi_tensor.h) on the CPU: every simulated block
// and thread executes process_block exactly as the GPU would, one after another. Registered as
// the CPU kernels of fused_opt::cuda_sim_adam_ etc., the ops behind backend="cuda_sim", so the
// tests check the chunking, index math and vector-load paths of the CUDA code without a GPU.
#include <torch/library.h>

#include <atomic>
#include <string>

#include "fused_opt/mta_ops.h"
#include "fused_opt/registration.h"

namespace fused_opt::mta {
namespace {

// Launches that the tests make fail (set_failing_sim_launches): a GPU launch can fail before it
// runs (an invalid configuration, say) and raises at once.
struct Failing {
  std::atomic<int> after{0}, count{0};  // `count` launches fail, after `after` that do not

  void fail_if_due(const char* what) {
    if (count.load() <= 0) return;
    if (after.load() > 0) {
      --after;
      return;
    }
    --count;
    throw c10::AcceleratorError({__func__, __FILE__, static_cast<uint32_t>(__LINE__)}, 1,
                                std::string("cuda_sim: a simulated launch failure (") + what + ")");
  }
};
Failing failing_updates, failing_counters;

struct SimRunner {
  // Launches smaller than the GPU's (32 tensors, 320 blocks), so that tests with CPU-sized tensors
  // cross launch boundaries: the same packing code, with other bounds; launch_plan below checks
  // the GPU's bounds.
  static constexpr Limits kLimits{32, 320, 7};
  struct Guard {
    explicit Guard(const at::Device&) {}
  };

  static at::Device check_device(const char* op, at::TensorList params) {
    for (size_t i = 0; i < params.size(); ++i) {
      TORCH_CHECK(params[i].device().is_cpu(), op, " (cuda_sim): params[", i, "] must be on cpu");
    }
    // Float32 step counters take the device path (read through pointers, like on the GPU).
    return params[0].device();
  }

  // What the GPU's launch could not hold or would read out of bounds is refused (the simulation's
  // bounds stand for Meta's capacity, which the GPU fills).
  static void check_launch(const Meta& meta, int blocks) {
    TORCH_CHECK(blocks > 0 && blocks <= kLimits.blocks, "cuda_sim: a launch of ", blocks, " blocks");
    for (int b = 0; b < blocks; ++b) {
      const int t = meta.block_tensor[b];
      TORCH_CHECK(t < kLimits.tensors && int64_t(meta.block_chunk[b]) * kChunk < meta.numel[t],
                  "cuda_sim: block ", b, " maps to tensor ", t, ", chunk ", meta.block_chunk[b], ", outside the launch");
    }
  }

  template <typename scalar_t, bool Master, typename Family>
  static void launch(const Meta& meta, int blocks, const Scalars& s, const Family& family) {
    failing_updates.fail_if_due("update");
    check_launch(meta, blocks);
    for (int b = 0; b < blocks; ++b) {
      for (int t = 0; t < kThreads; ++t) process_block<scalar_t, Master>(meta, s, family, b, t, kThreads);
    }
  }

  static void advance(const Counters& counters) {
    failing_counters.fail_if_due("step counters");
    TORCH_CHECK(counters.n > 0 && counters.n <= kLimits.counters, "cuda_sim: a launch of ", counters.n, " counters");
    const int blocks = (counters.n + kCounterThreads - 1) / kCounterThreads;
    for (int b = 0; b < blocks; ++b) {
      for (int t = 0; t < kCounterThreads; ++t) advance_counter(counters, b, t, kCounterThreads);
    }
  }
};

}  // namespace

void sim_table_step(const std::string& family, const TableArgs& a, const FamilyOptions& o) {
  table_step<SimRunner>(family, a, o);
}

void set_failing_sim_launches(int count, bool counters, int after) {
  Failing& f = counters ? failing_counters : failing_updates;
  f.after = after;
  f.count = count;
}

}  // namespace fused_opt::mta

void fused_opt::register_cuda_sim_kernels(torch::Library& m) {
  using Sim = mta::Ops<mta::SimRunner>;
  m.impl("cuda_sim_adam_", TORCH_FN(&Sim::adam));
  m.impl("cuda_sim_rmsprop_", TORCH_FN(&Sim::rmsprop));
  m.impl("cuda_sim_sgd_", TORCH_FN(&Sim::sgd));
}
