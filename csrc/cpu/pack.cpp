// The C++ ops' checks (checks.h) for the callers in Python (fused_opt/checks.py: the Triton
// launch, the reference, the functional layer's slow path), and the Triton launch's pointer
// table, when this extension is built: a fraction of the cost of checking tensor by tensor in Python.
#include <torch/extension.h>

#include "fused_opt/checks.h"

namespace fused_opt::cpu {

namespace py = pybind11;
using Tensors = std::vector<at::Tensor>;

// Where a step counter may live: on the CPU, or on its param's device.
static std::string step_devices(const at::Tensor& param) {
  return param.device().is_cpu() ? std::string("cpu") : "cpu or " + param.device().str();
}

// Checks one launch's lists (three state lists, unused ones empty; masters empty or one per
// param; steps on the CPU or the params' device) and writes nothing.
void check_lists(const std::string& op, const Tensors& params, const Tensors& grads, const std::vector<Tensors>& states,
                 const std::vector<bool>& used, const std::vector<std::string>& names, const Tensors& masters,
                 const Tensors& steps, bool steps_used) {
  TORCH_CHECK(states.size() == 3 && used.size() == 3 && names.size() == 3, op, ": expected three state lists");
  check_group(op.c_str(), params, grads,
              {{names[0].c_str(), states[0], used[0]}, {names[1].c_str(), states[1], used[1]},
               {names[2].c_str(), states[2], used[2]}},
              {"state_steps", steps, steps_used}, masters);
  for (int64_t i = 0; i < static_cast<int64_t>(steps.size()); ++i) {
    TORCH_CHECK(steps[i].device().is_cpu() || steps[i].device() == params[0].device(), op, ": state_steps[", i,
                "] is on ", steps[i].device(), ", expected ", step_devices(params[0]));
  }
}

// check_lists, then the pointer table, int64 [6, n] on the CPU (rows: param, grad, the three
// states, the master copies; 0 where unused), and the numels.
std::tuple<at::Tensor, at::Tensor> pack_group(const std::string& op, const Tensors& params, const Tensors& grads,
                                              const std::vector<Tensors>& states, const std::vector<bool>& used,
                                              const std::vector<std::string>& names, const Tensors& masters,
                                              const Tensors& steps, bool steps_used) {
  check_lists(op, params, grads, states, used, names, masters, steps, steps_used);
  const int64_t n = static_cast<int64_t>(params.size());
  at::Tensor table = at::zeros({6, n}, at::kLong);
  at::Tensor numels = at::empty({n}, at::kLong);
  auto rows = table.accessor<int64_t, 2>();
  auto sizes = numels.accessor<int64_t, 1>();
  for (int64_t i = 0; i < n; ++i) {
    rows[0][i] = reinterpret_cast<int64_t>(params[i].data_ptr());
    rows[1][i] = reinterpret_cast<int64_t>(grads[i].data_ptr());
    for (int k = 0; k < 3; ++k) {
      if (used[k]) rows[2 + k][i] = reinterpret_cast<int64_t>(states[k][i].data_ptr());
    }
    if (!masters.empty()) rows[5][i] = reinterpret_cast<int64_t>(masters[i].data_ptr());
    sizes[i] = params[i].numel();
  }
  return {table, numels};
}

// The step counters' addresses (int64 [n], CPU) when all live on `device` with one dtype (the
// Triton launch then advances them in a kernel); else, or with none, None.
std::optional<at::Tensor> counter_pointers(const Tensors& steps, c10::Device device) {
  if (steps.empty()) return std::nullopt;
  for (const at::Tensor& s : steps) {
    if (s.device() != device || s.scalar_type() != steps[0].scalar_type()) return std::nullopt;
  }
  at::Tensor out = at::empty({static_cast<int64_t>(steps.size())}, at::kLong);
  auto ptrs = out.accessor<int64_t, 1>();
  for (size_t i = 0; i < steps.size(); ++i) ptrs[i] = reinterpret_cast<int64_t>(steps[i].data_ptr());
  return out;
}

void bind_pack(py::module_& m) {
  m.def("check_lists", &check_lists, py::arg("op"), py::arg("params"), py::arg("grads"), py::arg("states"),
        py::arg("used"), py::arg("names"), py::arg("masters"), py::arg("steps"), py::arg("steps_used"));
  m.def("pack_group", &pack_group, py::arg("op"), py::arg("params"), py::arg("grads"), py::arg("states"),
        py::arg("used"), py::arg("names"), py::arg("masters"), py::arg("steps"), py::arg("steps_used"));
  m.def("counter_pointers", &counter_pointers, py::arg("steps"), py::arg("device"));
}

}  // namespace fused_opt::cpu
