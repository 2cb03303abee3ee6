// CPU implementations of fused_opt::adam_, rmsprop_ and sgd_ (schemas in fused_opt/ops.py):
// check everything, advance the step counters, cut the tensors into chunks, then hand over to
// the kernels of the best CPU capability.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>

#include "fused_opt/checks.h"
#include "fused_opt/registration.h"
#include "launch.h"

namespace fused_opt::cpu {
namespace {

using OptTensor = std::optional<at::Tensor>;

// Packs the lists into a launch; nullopt when found_inf says this step must be skipped.
std::optional<Launch> make_launch(at::TensorList params, at::TensorList grads, std::initializer_list<at::TensorList> states,
                                  at::TensorList masters, double lr, const OptTensor& lr_tensor, const OptTensor& grad_scale,
                                  const OptTensor& found_inf) {
  const StepScalars scalars = read_scalars(lr, lr_tensor, grad_scale, found_inf);
  if (scalars.skip) return std::nullopt;
  Launch launch;
  launch.dtype = params.empty() ? at::kFloat : params[0].scalar_type();
  launch.lr = scalars.lr;
  launch.inv_grad_scale = scalars.inv_grad_scale;
  launch.tensors.reserve(params.size());
  launch.slot_mask = 0b11;
  int bit = 2;
  for (at::TensorList list : states) {
    if (!list.empty()) launch.slot_mask |= 1 << bit;
    ++bit;
  }
  if (!masters.empty()) launch.slot_mask |= 1 << kMaster;
  for (size_t i = 0; i < params.size(); ++i) {
    Pointers ptr{params[i].data_ptr(), grads[i].data_ptr()};
    int slot = 2;
    for (at::TensorList list : states) {
      ptr[slot++] = list.empty() ? nullptr : list[i].data_ptr();
    }
    if (!masters.empty()) ptr[kMaster] = masters[i].data_ptr();
    add_tensor(launch, ptr, params[i].numel());
  }
  return launch;
}

void check_device(const char* op, at::TensorList params, at::TensorList steps = {}) {
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].device().is_cpu(), op, ": params[", i, "] is on ", params[i].device(), ", expected cpu");
  }
  for (size_t i = 0; i < steps.size(); ++i) {
    TORCH_CHECK(steps[i].device().is_cpu(), op, ": state_steps[", i, "] is on ", steps[i].device(), ", expected cpu");
  }
}

// A hyperparameter given as a tensor: its value now (the CPU kernels run on the host anyway).
double value_of(double value, const OptTensor& tensor) { return tensor ? tensor->item<double>() : value; }

void adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
              at::TensorList max_exp_avg_sqs, at::TensorList master_params, at::TensorList state_steps, double lr,
              double beta1, double beta2, double weight_decay, double eps, bool amsgrad, bool maximize, bool decoupled_weight_decay, double l1,
              bool l1_proximal, const OptTensor& lr_tensor, const OptTensor& grad_scale, const OptTensor& found_inf,
              const OptTensor& weight_decay_tensor) {
  const char* op = "fused_opt::adam_";
  check_group(op, params, grads,
              {{"exp_avgs", exp_avgs, true}, {"exp_avg_sqs", exp_avg_sqs, true}, {"max_exp_avg_sqs", max_exp_avg_sqs, amsgrad}},
              {"state_steps", state_steps, true}, master_params);
  check_device(op, params, state_steps);
  check_scalars(op, lr_tensor, grad_scale, found_inf, weight_decay_tensor);
  weight_decay = value_of(weight_decay, weight_decay_tensor);
  auto launch = make_launch(params, grads, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs}, master_params, lr, lr_tensor, grad_scale, found_inf);
  if (!launch) return;
  const std::vector<double> steps = advance_steps(state_steps);
  for (size_t i = 0; i < steps.size(); ++i) launch->tensors[i].step = steps[i];
  const AdamOptions o{beta1, beta2, eps, amsgrad, {maximize, weight_decay, decoupled_weight_decay, l1, l1_proximal}};
  adam(*launch, o);
}

void rmsprop_cpu(at::TensorList params, at::TensorList grads, at::TensorList square_avgs, at::TensorList grad_avgs,
                 at::TensorList momentum_buffers, at::TensorList master_params, at::TensorList state_steps, double lr,
                 double alpha, double eps,
                 double weight_decay, double momentum, bool centered, bool maximize, double l1, bool l1_proximal,
                 const OptTensor& lr_tensor, const OptTensor& grad_scale, const OptTensor& found_inf,
                 const OptTensor& weight_decay_tensor) {
  const char* op = "fused_opt::rmsprop_";
  check_group(op, params, grads,
              {{"square_avgs", square_avgs, true}, {"grad_avgs", grad_avgs, centered},
               {"momentum_buffers", momentum_buffers, momentum > 0.0}},
              {"state_steps", state_steps, true}, master_params);
  check_device(op, params, state_steps);
  check_scalars(op, lr_tensor, grad_scale, found_inf, weight_decay_tensor);
  weight_decay = value_of(weight_decay, weight_decay_tensor);
  auto launch = make_launch(params, grads, {square_avgs, grad_avgs, momentum_buffers}, master_params, lr, lr_tensor, grad_scale, found_inf);
  if (!launch) return;
  advance_steps(state_steps);
  const RMSpropOptions o{alpha, eps, momentum, centered, {maximize, weight_decay, false, l1, l1_proximal}};
  rmsprop(*launch, o);
}

void sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, at::TensorList master_params,
             double lr,
             double weight_decay, double momentum, double dampening, bool nesterov, bool maximize, bool first_step,
             double l1, bool l1_proximal, const OptTensor& lr_tensor, const OptTensor& grad_scale,
             const OptTensor& found_inf, const OptTensor& weight_decay_tensor) {
  const char* op = "fused_opt::sgd_";
  check_group(op, params, grads, {{"momentum_buffers", momentum_buffers, momentum != 0.0}}, {"state_steps", {}, false},
              master_params);
  check_device(op, params);
  check_scalars(op, lr_tensor, grad_scale, found_inf, weight_decay_tensor);
  weight_decay = value_of(weight_decay, weight_decay_tensor);
  auto launch = make_launch(params, grads, {momentum_buffers}, master_params, lr, lr_tensor, grad_scale, found_inf);
  if (!launch) return;
  const SGDOptions o{momentum, dampening, nesterov, first_step, {maximize, weight_decay, false, l1, l1_proximal}};
  sgd(*launch, o);
}

}  // namespace
}  // namespace fused_opt::cpu

void fused_opt::register_cpu_kernels(torch::Library& m) {
  m.impl("adam_", &cpu::adam_cpu);
  m.impl("rmsprop_", &cpu::rmsprop_cpu);
  m.impl("sgd_", &cpu::sgd_cpu);
}
