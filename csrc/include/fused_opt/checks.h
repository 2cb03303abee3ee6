// Every check a multi-tensor op makes before it writes anything (host code, shared by the CPU and
// CUDA ops, and by the code in Python that writes through fused_opt/checks.py and _C.check_lists:
// the Triton launch, the reference, the functional layer's slow path).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>
#include <string>

namespace fused_opt {

struct NamedList {
  const char* name;
  at::TensorList tensors;
  bool used;  // an unused list (e.g. max_exp_avg_sqs without amsgrad) must be empty
};

// Same element order in memory: equal sizes, and equal strides wherever a dimension has more
// than one element.
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  const at::IntArrayRef sizes = a.sizes(), sa = a.strides(), sb = b.strides();
  if (sizes != b.sizes()) return false;
  if (sa == sb) return true;  // the usual case, without a loop (the group tables check every tensor each step)
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] > 1 && sa[d] != sb[d]) return false;
  }
  return true;
}

// What the messages name, spelt as Python prints it (torch.float32, (2, 5), torch.sparse_coo): a
// refusal reads the same from these checks and from fused_opt/checks.py's.
inline std::string python_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline std::string python_name(at::Layout layout) {
  switch (layout) {
    case at::kStrided: return "torch.strided";
    case at::kSparse: return "torch.sparse_coo";
    case at::kSparseCsr: return "torch.sparse_csr";
    case at::kSparseCsc: return "torch.sparse_csc";
    case at::kSparseBsr: return "torch.sparse_bsr";
    case at::kSparseBsc: return "torch.sparse_bsc";
    case at::kMkldnn: return "torch._mkldnn";
    default: return "torch." + c10::str(layout);
  }
}

// A shape or strides as Python's tuple: (), (5,), (2, 5).
inline std::string python_name(at::IntArrayRef values) {
  std::string out = "(";
  for (size_t d = 0; d < values.size(); ++d) out += (d ? ", " : "") + std::to_string(values[d]);
  return out + (values.size() == 1 ? ",)" : ")");
}

inline bool is_half_precision(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// `dtype`: what t must hold -- its param's dtype, or float32 for the master copies and states of
// 16-bit params with master weights.
inline void check_like_param(const char* op, const char* name, size_t i, const at::Tensor& t, const at::Tensor& p,
                             at::ScalarType dtype) {
  TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined");
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, "[", i, "] must be a dense tensor, got layout ",
              python_name(t.layout()));
  TORCH_CHECK(t.device() == p.device(), op, ": ", name, "[", i, "] is on ", t.device(), " but its param is on ", p.device());
  if (dtype == p.scalar_type()) {
    TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, "[", i, "] has dtype ", python_name(t.scalar_type()),
                " but its param has dtype ", python_name(p.scalar_type()));
  } else {
    TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, "[", i, "] has dtype ", python_name(t.scalar_type()),
                " but must be ", python_name(dtype), " (its param is ", python_name(p.scalar_type()),
                " with float32 master weights)");
  }
  TORCH_CHECK(same_layout(t, p), op, ": ", name, "[", i, "] has shape ", python_name(t.sizes()), " and strides ",
              python_name(t.strides()), " but its param has shape ", python_name(p.sizes()), " and strides ",
              python_name(p.strides()));
}

// Checks list lengths, then each param (one device and dtype for the whole call, dense memory)
// and each grad/state tensor against its param, then the step counters. `masters` (empty, or one
// float32 master copy per 16-bit param) makes the states float32 too.
inline void check_group(const char* op, at::TensorList params, at::TensorList grads,
                        std::initializer_list<NamedList> states, const NamedList& steps, at::TensorList masters = {}) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, op, ": expected ", n, " grads (one per param), got ", grads.size());
  for (const NamedList& s : states) {
    const size_t want = s.used ? n : 0;
    TORCH_CHECK(s.tensors.size() == want, op, ": expected ", want, " tensors in ", s.name, ", got ", s.tensors.size());
  }
  TORCH_CHECK(masters.empty() || masters.size() == n, op, ": expected 0 or ", n, " tensors in master_params, got ",
              masters.size());
  TORCH_CHECK(steps.tensors.size() == (steps.used ? n : 0), op, ": expected ", (steps.used ? n : 0),
              " tensors in ", steps.name, ", got ", steps.tensors.size());
  if (n == 0) return;
  const at::Tensor& first = params[0];
  TORCH_CHECK(first.defined(), op, ": params[0] is undefined");
  const auto dtype = first.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": params must be float32, float64, float16 or bfloat16, got ", python_name(dtype));
  TORCH_CHECK(masters.empty() || is_half_precision(dtype), op, ": master_params are for float16 and bfloat16 params; params are ",
              python_name(dtype), " (pass an empty list)");
  const auto state_dtype = masters.empty() ? dtype : at::kFloat;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined(), op, ": params[", i, "] is undefined");
    TORCH_CHECK(p.layout() == at::kStrided, op, ": params[", i, "] must be a dense tensor, got layout ",
                python_name(p.layout()));
    TORCH_CHECK(p.device() == first.device() && p.scalar_type() == dtype, op, ": params[", i, "] is ",
                python_name(p.scalar_type()), " on ", p.device(), " but params[0] is ", python_name(dtype), " on ",
                first.device(), "; call once per (device, dtype) group");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), op, ": params[", i,
                "] must be non-overlapping and dense (e.g. contiguous); got strides ",
                python_name(p.strides()));
    check_like_param(op, "grads", i, grads[i], p, dtype);
    for (const NamedList& s : states) {
      if (s.used) check_like_param(op, s.name, i, s.tensors[i], p, state_dtype);
    }
    if (!masters.empty()) check_like_param(op, "master_params", i, masters[i], p, at::kFloat);
    if (steps.used) {
      const at::Tensor& s = steps.tensors[i];
      TORCH_CHECK(s.defined() && s.layout() == at::kStrided && s.numel() == 1 &&
                      (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble),
                  op, ": ", steps.name, "[", i, "] must be a one-element dense float32 or float64 tensor");
    }
  }
}

inline void check_scalar_tensor(const char* op, const char* name, const std::optional<at::Tensor>& t) {
  if (t.has_value()) {
    TORCH_CHECK(t->defined() && t->numel() == 1, op, ": ", name, " must be a one-element tensor");
  }
}

// The optional per-step scalars every op takes, each one element when given.
inline void check_scalars(const char* op, const std::optional<at::Tensor>& lr_tensor,
                          const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                          const std::optional<at::Tensor>& weight_decay_tensor) {
  check_scalar_tensor(op, "lr_tensor", lr_tensor);
  check_scalar_tensor(op, "grad_scale", grad_scale);
  check_scalar_tensor(op, "found_inf", found_inf);
  check_scalar_tensor(op, "weight_decay_tensor", weight_decay_tensor);
}

}  // namespace fused_opt
