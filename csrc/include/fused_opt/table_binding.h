// Python bindings of the multi-tensor traversal: a table step (mta_ops.h, TableArgs), shared by
// the CPU module (fused_opt._C.sim_table_step, the CUDA traversal simulated on the CPU) and the
// CUDA module (fused_opt._C_cuda.table_step; called by fused_opt/tables.py with the family's
// options as functional.OPTIONS builds them), and the CPU module's launch_plan (for the tests).
#pragma once

#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

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

// launch_plan(numels, max_tensors=None, max_blocks=None): how for_each_launch packs tensors of
// these sizes into launches (the GPU's bounds by default), without running them. Each launch is
// (the block count the launch was given, its blocks), a block being (address of slot 0, address
// of slot 5, numel, host step, chunk), where tensor t is described with address of slot k =
// 8 * (16 * (t + 1) + k) and host step t, so the tests can check that every chunk of every tensor
// is covered once, with its own metadata. Blocks past Meta's capacity are counted, not read.
inline void bind_launch_plan(pybind11::module_& m) {
  namespace py = pybind11;
  m.def(
      "launch_plan",
      [](const std::vector<int64_t>& numels, std::optional<int> max_tensors, std::optional<int> max_blocks) {
        const Limits limits{max_tensors.value_or(kMaxTensors), max_blocks.value_or(kMaxBlocks)};
        TORCH_CHECK(limits.tensors >= 1 && limits.tensors <= kMaxTensors && limits.blocks >= 1 &&
                        limits.blocks <= kMaxBlocks,
                    "launch_plan: limits must be within 1..", kMaxTensors, " tensors and 1..", kMaxBlocks, " blocks");
        struct Describe {
          const std::vector<int64_t>& numels;
          int64_t numel(int t) const { return numels[t]; }
          void* addr(int t, int k) const { return reinterpret_cast<void*>(uintptr_t(8 * (16 * (t + 1) + k))); }
          double step_host(int t) const { return double(t); }
          const float* step_dev(int) const { return nullptr; }
        } d{numels};
        using Block = std::tuple<uintptr_t, uintptr_t, int64_t, double, int64_t>;
        std::vector<std::pair<int, std::vector<Block>>> plan;
        for_each_launch(static_cast<int>(numels.size()), d, limits, [&](const Meta& meta, int blocks) {
          auto& [count, launch] = plan.emplace_back(blocks, std::vector<Block>{});
          (void)count;
          for (int b = 0; b < blocks && b < kMaxBlocks; ++b) {
            const int t = meta.block_tensor[b];
            launch.emplace_back(reinterpret_cast<uintptr_t>(meta.addr[0][t]), reinterpret_cast<uintptr_t>(meta.addr[kMaster][t]),
                                meta.numel[t], meta.step_host[t], meta.block_chunk[b]);
          }
        });
        return plan;
      },
      py::arg("numels"), py::arg("max_tensors") = py::none(), py::arg("max_blocks") = py::none());
  m.attr("counters_per_launch") = kMaxCounters;  // device step counters one launch advances on a GPU
}

}  // namespace fused_opt::mta
