// Host side of the multi-tensor ops (fused_opt::adam_, rmsprop_, sgd_) for a traversal backend:
// the CUDA kernels (csrc/cuda/ops_cuda.cu) and their CPU simulation (csrc/cpu/cuda_sim.cpp).
// `Runner` supplies check_device(op, params), a Guard type, kLimits (how full a launch gets),
// launch<scalar_t, Master>(meta, blocks, scalars, family) and advance(counters);
// everything else (checks, step counters, scalar tensors, packing of launches) is shared here.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "fused_opt/checks.h"
#include "fused_opt/multi_tensor.h"

namespace fused_opt::mta {

using OptTensor = std::optional<at::Tensor>;

// Keeps alive the float32 copies of scalar tensors that the kernels read.
struct ScalarTensors {
  Scalars s{};
  std::vector<at::Tensor> keep;
  bool skip = false;  // found_inf known on the host and set
  std::optional<double> weight_decay_host;  // a weight decay tensor kept on the host
};

inline ScalarTensors make_scalars(double lr, const OptTensor& lr_tensor, const OptTensor& grad_scale,
                                  const OptTensor& found_inf, const OptTensor& weight_decay_tensor,
                                  const at::Device& device) {
  ScalarTensors out;
  out.s.lr = lr;
  out.s.inv_scale_host = 1.0;
  auto on_device = [&](const at::Tensor& t) -> const float* {
    at::Tensor f = t.to(device, at::kFloat);
    out.keep.push_back(f);
    return f.data_ptr<float>();
  };
  // lr, weight decay and found_inf on the host for a GPU launch: read once here. Otherwise the
  // kernels read them through pointers (so the CPU simulation runs the device path too).
  const auto on_host = [&](const at::Tensor& t) { return t.device().is_cpu() && !device.is_cpu(); };
  if (lr_tensor) {
    if (on_host(*lr_tensor)) out.s.lr = lr_tensor->item<double>();
    else out.s.lr_dev = on_device(*lr_tensor);
  }
  if (grad_scale) {
    if (grad_scale->device().is_cpu()) out.s.inv_scale_host = 1.0 / grad_scale->item<double>();
    else out.s.grad_scale = on_device(*grad_scale);
  }
  if (found_inf) {
    if (on_host(*found_inf)) out.skip = found_inf->item<double>() != 0.0;
    else out.s.found_inf = on_device(*found_inf);
  }
  if (weight_decay_tensor) {
    if (on_host(*weight_decay_tensor)) out.weight_decay_host = weight_decay_tensor->item<double>();
    else out.s.weight_decay_dev = on_device(*weight_decay_tensor);
  }
  return out;
}

// Advances (sign +1) or puts back (sign -1) float32 counters on the device, by 1 or, when
// found_inf (a float32 device pointer) is given, by 1 - found_inf: Runner::advance's launches
// (multi_tensor.h, Counters), each over up to kLimits.counters of them.
// A launch that fails raises at once: the ones before it are then undone (best effort: a launch
// error can leave the device unusable), so that the op raises with every counter as it was.
template <typename Runner>
void move_counters(const std::vector<at::Tensor>& counters, const float* found_inf, float sign) {
  auto c = std::make_unique<Counters>();  // 32 KB: not on the stack
  c->found_inf = found_inf;
  const int n = static_cast<int>(counters.size()), per_launch = Runner::kLimits.counters;
  const auto launch = [&](int start, int count, float s) {
    c->n = count;
    c->sign = s;
    for (int i = 0; i < count; ++i) c->step[i] = counters[start + i].data_ptr<float>();
    Runner::advance(*c);
  };
  int moved = 0;
  try {
    for (; moved < n; moved += c->n) launch(moved, std::min(per_launch, n - moved), sign);
  } catch (...) {
    try {
      for (int start = 0; start < moved; start += per_launch) launch(start, std::min(per_launch, moved - start), -sign);
    } catch (...) {
    }
    throw;
  }
}

// Step counters: float32 ones on the params' device are advanced there (move_counters), by
// 1 - found_inf when found_inf is on the device (no host sync), and read by the kernels;
// the others, on the host, are advanced here and their values passed in the launch metadata. A
// group may hold both kinds (capturable switched on mid-run gives the new params device counters).
struct Steps {
  std::vector<double> host;
  std::vector<const float*> dev;  // per tensor: its device counter, or null (then `host` holds the step)
  std::vector<at::Tensor> on_device, on_host;  // the counters this op advanced, for retreat()
  const float* found_inf = nullptr;  // the device counters' increment is 1 - *found_inf when set

  // Puts the counters back when no launch was made (a launch that fails raises at once), so that
  // the op raises with nothing changed. On the device this may fail in turn (a launch error can
  // leave the device unusable): then the launch's error is the one that counts.
  template <typename Runner>
  void retreat() const {
    for (const at::Tensor& s : on_host) {
      if (s.scalar_type() == at::kFloat) *s.data_ptr<float>() -= 1.0f;
      else *s.data_ptr<double>() -= 1.0;
    }
    if (on_device.empty()) return;
    try {
      move_counters<Runner>(on_device, found_inf, -1.0f);
    } catch (...) {
    }
  }
};

inline bool device_counter(const at::Tensor& s, const at::Device& device) {
  return s.device() == device && s.scalar_type() == at::kFloat;
}

template <typename Runner>
Steps advance_steps(at::TensorList steps, const at::Device& device, const ScalarTensors& sc,
                    const OptTensor& found_inf) {
  Steps out;
  out.host.assign(steps.size(), 0.0);
  out.dev.assign(steps.size(), nullptr);
  for (size_t i = 0; i < steps.size(); ++i) {  // all checked before any is advanced
    if (device_counter(steps[i], device)) {
      out.on_device.push_back(steps[i]);
    } else {
      TORCH_CHECK(steps[i].device().is_cpu(), "fused_opt: state_steps[", i, "] must be on cpu or float32 on ", device);
    }
  }
  const bool has_host = out.on_device.size() < steps.size();
  // Host counters under a found_inf read on the device: one sync, to know whether to count the step.
  const bool host_skip = has_host && sc.s.found_inf != nullptr && found_inf->item<double>() != 0.0;
  if (!out.on_device.empty()) {
    out.found_inf = sc.s.found_inf;  // found_inf's float32 copy on the params' device, when it is there
    move_counters<Runner>(out.on_device, out.found_inf, 1.0f);
  }
  for (size_t i = 0; i < steps.size(); ++i) {
    at::Tensor s = steps[i];
    if (device_counter(s, device)) {
      out.dev[i] = s.data_ptr<float>();
    } else if (!host_skip) {
      out.host[i] = s.scalar_type() == at::kFloat ? double(*s.data_ptr<float>() += 1.0f) : (*s.data_ptr<double>() += 1.0);
      out.on_host.push_back(s);
    }
  }
  return out;
}

// All launches over n tensors described by `d` (addr, numel, step_host, step_dev of tensor t);
// if the first one fails, the step counters are put back before the error goes on.
template <typename Runner, typename Describe, typename Family>
void launch_all(int n, const Describe& d, at::ScalarType dtype, bool master, const ScalarTensors& sc,
                const Family& family) {
  int launched = 0;
  try {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "fused_opt_mta", [&] {
      constexpr bool half = std::is_same_v<scalar_t, at::BFloat16> || std::is_same_v<scalar_t, at::Half>;
      const auto launch = [&](const Meta& meta, int blocks) {
        if constexpr (half) {  // fp32 master weights exist for 16-bit params only (checked before)
          if (master) return Runner::template launch<scalar_t, true>(meta, blocks, sc.s, family);
        }
        Runner::template launch<scalar_t, false>(meta, blocks, sc.s, family);
      };
      for_each_launch(n, d, Runner::kLimits, [&](const Meta& meta, int blocks) {
        launch(meta, blocks);
        ++launched;
      });
    });
  } catch (...) {
    if (launched == 0) d.steps.template retreat<Runner>();
    throw;
  }
}

template <typename Runner, typename Family>
void run(at::TensorList params, at::TensorList grads, std::initializer_list<at::TensorList> states,
         at::TensorList masters, const Steps& steps, const ScalarTensors& sc, const Family& family) {
  struct Describe {
    at::TensorList params, grads;
    std::vector<at::TensorList> states;
    at::TensorList masters;
    const Steps& steps;
    int64_t numel(int t) const { return params[t].numel(); }
    void* addr(int t, int k) const {
      if (k == 0) return params[t].data_ptr();
      if (k == 1) return grads[t].data_ptr();
      if (k == kMaster) return masters.empty() ? nullptr : masters[t].data_ptr();
      const size_t j = size_t(k - 2);
      return j < states.size() && !states[j].empty() ? states[j][t].data_ptr() : nullptr;
    }
    double step_host(int t) const { return steps.host.empty() ? 0.0 : steps.host[t]; }
    const float* step_dev(int t) const { return steps.dev.empty() ? nullptr : steps.dev[t]; }
  } d{params, grads, std::vector<at::TensorList>(states), masters, steps};
  launch_all<Runner>(static_cast<int>(params.size()), d, params[0].scalar_type(), !masters.empty(), sc, family);
}

// Everything an op does once its lists passed check_group: device and guard, scalar tensors, the
// found_inf early exit, step counters, then the launches. The three ops differ only in their
// checks and their Family.
template <typename Runner, typename Family>
void update(const char* op, at::TensorList params, at::TensorList grads, std::initializer_list<at::TensorList> states,
            at::TensorList masters, at::TensorList state_steps, double lr, const OptTensor& lr_tensor, const OptTensor& grad_scale,
            const OptTensor& found_inf, const OptTensor& weight_decay_tensor, const Family& family) {
  check_scalars(op, lr_tensor, grad_scale, found_inf, weight_decay_tensor);
  if (params.empty()) return;
  const at::Device device = Runner::check_device(op, params);
  typename Runner::Guard guard(device);
  const ScalarTensors sc = make_scalars(lr, lr_tensor, grad_scale, found_inf, weight_decay_tensor, device);
  if (sc.skip) return;
  const Steps steps = advance_steps<Runner>(state_steps, device, sc, found_inf);
  run<Runner>(params, grads, states, masters, steps, sc,
              sc.weight_decay_host ? with_weight_decay(family, *sc.weight_decay_host) : family);
}

template <typename Runner>
struct Ops {
  static void adam(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList max_exp_avg_sqs, at::TensorList master_params, at::TensorList state_steps, double lr,
                   double beta1, double beta2,
                   double weight_decay, double eps, bool amsgrad, bool maximize, bool decoupled_weight_decay,
                   double l1, bool l1_proximal, const OptTensor& lr_tensor, const OptTensor& grad_scale,
                   const OptTensor& found_inf, const OptTensor& weight_decay_tensor) {
    const char* op = "fused_opt::adam_";
    check_group(op, params, grads,
                {{"exp_avgs", exp_avgs, true}, {"exp_avg_sqs", exp_avg_sqs, true},
                 {"max_exp_avg_sqs", max_exp_avg_sqs, amsgrad}},
                {"state_steps", state_steps, true}, master_params);
    const AdamFamily family{{beta1, beta2, eps, amsgrad, {maximize, weight_decay, decoupled_weight_decay, l1, l1_proximal}}};
    update<Runner>(op, params, grads, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs}, master_params, state_steps, lr, lr_tensor, grad_scale,
                   found_inf, weight_decay_tensor, family);
  }

  static void rmsprop(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                      at::TensorList grad_avgs, at::TensorList momentum_buffers, at::TensorList master_params,
                      at::TensorList state_steps, double lr,
                      double alpha, double eps, double weight_decay, double momentum, bool centered, bool maximize,
                      double l1, bool l1_proximal, const OptTensor& lr_tensor, const OptTensor& grad_scale,
                      const OptTensor& found_inf, const OptTensor& weight_decay_tensor) {
    const char* op = "fused_opt::rmsprop_";
    check_group(op, params, grads,
                {{"square_avgs", square_avgs, true}, {"grad_avgs", grad_avgs, centered},
                 {"momentum_buffers", momentum_buffers, momentum > 0.0}},
                {"state_steps", state_steps, true}, master_params);
    const RMSpropFamily family{{alpha, eps, momentum, centered, {maximize, weight_decay, false, l1, l1_proximal}}};
    update<Runner>(op, params, grads, {square_avgs, grad_avgs, momentum_buffers}, master_params, state_steps, lr, lr_tensor,
                   grad_scale, found_inf, weight_decay_tensor, family);
  }

  static void sgd(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  at::TensorList master_params, double lr,
                  double weight_decay, double momentum, double dampening, bool nesterov, bool maximize,
                  bool first_step, double l1, bool l1_proximal, const OptTensor& lr_tensor,
                  const OptTensor& grad_scale, const OptTensor& found_inf, const OptTensor& weight_decay_tensor) {
    const char* op = "fused_opt::sgd_";
    check_group(op, params, grads, {{"momentum_buffers", momentum_buffers, momentum != 0.0}},
                {"state_steps", {}, false}, master_params);
    const SGDFamily family{{momentum, dampening, nesterov, first_step, {maximize, weight_decay, false, l1, l1_proximal}}};
    update<Runner>(op, params, grads, {momentum_buffers}, master_params, {}, lr, lr_tensor, grad_scale, found_inf,
                   weight_decay_tensor, family);
  }
};

// ---------------------------------------------------------------- launches from a pointer table
// The optimizers' cached group tables (fused_opt/tables.py, csrc/cpu/tables.cpp) check a group's
// tensors once and then pass only addresses: int64 [6, n] in slot order (0 where unused; the
// float32 master copies of 16-bit params in row 5, for all tensors or none), with this step's
// grads in row 1, and the numels. Everything else is as an op.
struct TableArgs {
  at::Tensor table, numels;  // CPU int64
  at::ScalarType dtype;
  at::Device device;
  std::vector<at::Tensor> steps;  // the step counters, in table order (none for SGD)
  double lr;
  OptTensor lr_tensor, grad_scale, found_inf;
};

// The options of the family named in a table step (the one that is used).
struct FamilyOptions {
  AdamOptions adam;
  RMSpropOptions rmsprop;
  SGDOptions sgd;
};

template <typename Runner, typename Family>
void table_update(const TableArgs& a, const Family& family) {
  const int64_t n = a.numels.numel();
  TORCH_CHECK(a.table.scalar_type() == at::kLong && a.table.is_contiguous() && a.table.dim() == 2 &&
                  a.table.size(0) == kSlots && a.table.size(1) == n && a.numels.scalar_type() == at::kLong &&
                  a.numels.is_contiguous() && (a.steps.empty() || int64_t(a.steps.size()) == n),
              "fused_opt: malformed pointer table");
  if (n == 0) return;
  const int64_t* rows = a.table.data_ptr<int64_t>();
  const bool master = rows[kMaster * n] != 0;
  for (int64_t t = 0; t < n; ++t) {
    TORCH_CHECK((rows[kMaster * n + t] != 0) == master, "fused_opt: malformed pointer table (master copies of some tensors only)");
  }
  TORCH_CHECK(!master || a.dtype == at::kHalf || a.dtype == at::kBFloat16,
              "fused_opt: malformed pointer table (master copies of ", a.dtype, " params)");
  typename Runner::Guard guard(a.device);
  const ScalarTensors sc = make_scalars(a.lr, a.lr_tensor, a.grad_scale, a.found_inf, std::nullopt, a.device);
  if (sc.skip) return;
  const Steps steps = advance_steps<Runner>(a.steps, a.device, sc, a.found_inf);
  struct Describe {
    const int64_t* rows;
    int64_t n;
    const int64_t* numels;
    const Steps& steps;
    int64_t numel(int t) const { return numels[t]; }
    void* addr(int t, int k) const { return reinterpret_cast<void*>(rows[k * n + t]); }
    double step_host(int t) const { return steps.host.empty() ? 0.0 : steps.host[t]; }
    const float* step_dev(int t) const { return steps.dev.empty() ? nullptr : steps.dev[t]; }
  } d{rows, n, a.numels.data_ptr<int64_t>(), steps};
  launch_all<Runner>(static_cast<int>(n), d, a.dtype, master, sc, family);
}

template <typename Runner>
void table_step(const std::string& family, const TableArgs& a, const FamilyOptions& o) {
  if (family == "adam") return table_update<Runner>(a, AdamFamily{o.adam});
  if (family == "rmsprop") return table_update<Runner>(a, RMSpropFamily{o.rmsprop});
  TORCH_CHECK(family == "sgd", "fused_opt: unknown algorithm family ", family);
  table_update<Runner>(a, SGDFamily{o.sgd});
}

// Defined by the CUDA kernels (ops_cuda.cu) and by their CPU simulation (cuda_sim.cpp).
void cuda_table_step(const std::string& family, const TableArgs& a, const FamilyOptions& o);
void sim_table_step(const std::string& family, const TableArgs& a, const FamilyOptions& o);
// cuda_sim.cpp: `count` simulated launches (of updates, or of step counters) fail, after `after` that do not.
void set_failing_sim_launches(int count, bool counters, int after);

}  // namespace fused_opt::mta
