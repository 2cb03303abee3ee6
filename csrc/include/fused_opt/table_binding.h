// Python binding of a multi-tensor table step (mta_ops.h, TableArgs), shared by the CPU module
// (fused_opt._C.sim_table_step, the CUDA traversal simulated on the CPU) and the CUDA module
// (fused_opt._C_cuda.table_step). Called by fused_opt/tables.py with the family's options as
// functional.OPTIONS builds them.
#pragma once

#include <torch/extension.h>

#include <string>

#include "fused_opt/mta_ops.h"

namespace fused_opt::mta {

inline FamilyOptions parse_options(const std::string& family, const pybind11::dict& o) {
  const auto d = [&](const char* key) { return o[key].cast<double>(); };
  const auto b = [&](const char* key) { return o[key].cast<bool>(); };
  const GradOptions grad{b("maximize"), d("weight_decay"), family == "adam" && b("decoupled_weight_decay"), d("l1"),
                         b("l1_proximal")};
  FamilyOptions out{};
  if (family == "adam") out.adam = {d("beta1"), d("beta2"), d("eps"), b("amsgrad"), grad};
  if (family == "rmsprop") out.rmsprop = {d("alpha"), d("eps"), d("momentum"), b("centered"), grad};
  if (family == "sgd") out.sgd = {d("momentum"), d("dampening"), b("nesterov"), b("first_step"), grad};
  return out;
}

using TableStepFn = void (*)(const std::string&, const TableArgs&, const FamilyOptions&);

inline void bind_table_step(pybind11::module_& m, const char* name, TableStepFn step) {
  namespace py = pybind11;
  m.def(
      name,
      [step](const std::string& family, const at::Tensor& table, const at::Tensor& numels, const at::Tensor& like,
             const std::vector<at::Tensor>& steps, double lr, const OptTensor& lr_tensor, const OptTensor& grad_scale,
             const OptTensor& found_inf, const py::dict& options) {
        const FamilyOptions o = parse_options(family, options);
        const TableArgs a{table, numels, like.scalar_type(), like.device(), steps, lr, lr_tensor, grad_scale, found_inf};
        py::gil_scoped_release release;
        step(family, a, o);
      },
      py::arg("family"), py::arg("table"), py::arg("numels"), py::arg("like"), py::arg("steps"), py::arg("lr"),
      py::arg("lr_tensor") = py::none(), py::arg("grad_scale") = py::none(), py::arg("found_inf") = py::none(),
      py::arg("options"));
}

}  // namespace fused_opt::mta
