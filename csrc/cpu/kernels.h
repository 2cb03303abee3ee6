// The CPU kernels: one pass over each chunk, SIMD body (at::vec) plus a scalar tail, all math in
// opmath (float for 16-bit params). Included by one .cpp per CPU capability, which defines
// CPU_CAPABILITY (the namespace the functions land in) before including this file.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "launch.h"
#include "vec_ops.h"

namespace fused_opt::cpu::CPU_CAPABILITY {

template <typename scalar_t>
constexpr bool is_16bit = std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>;

// Runs fn(x) over n elements, where x[k] is slot k's value (slot 1, the grad, is never stored;
// null slots are neither loaded nor stored).
template <typename scalar_t, typename Fn>
void for_each_element(const std::array<scalar_t*, kSlots>& ptr, int64_t n, const Fn& fn) {
  using Vec = at::vec::Vectorized<scalar_t>;
  using opmath_t = at::opmath_type<scalar_t>;
  using OVec = at::vec::Vectorized<opmath_t>;
  constexpr int64_t width = Vec::size();
  int64_t i = 0;
  for (; i + width <= n; i += width) {
    if constexpr (is_16bit<scalar_t>) {
      std::array<OVec, kSlots> lo, hi;
      for (int k = 0; k < kSlots; ++k) {
        if (ptr[k]) std::tie(lo[k], hi[k]) = at::vec::convert_to_float<scalar_t>(Vec::loadu(ptr[k] + i));
      }
      fn(lo);
      fn(hi);
      for (int k = 0; k < kSlots; ++k) {
        if (ptr[k] && k != 1) at::vec::convert_from_float<scalar_t>(lo[k], hi[k]).store(ptr[k] + i);
      }
    } else {
      std::array<OVec, kSlots> x;
      for (int k = 0; k < kSlots; ++k) {
        if (ptr[k]) x[k] = OVec::loadu(ptr[k] + i);
      }
      fn(x);
      for (int k = 0; k < kSlots; ++k) {
        if (ptr[k] && k != 1) x[k].store(ptr[k] + i);
      }
    }
  }
  for (; i < n; ++i) {
    std::array<opmath_t, kSlots> x{};
    for (int k = 0; k < kSlots; ++k) {
      if (ptr[k]) x[k] = static_cast<opmath_t>(ptr[k][i]);
    }
    fn(x);
    for (int k = 0; k < kSlots; ++k) {
      if (ptr[k] && k != 1) ptr[k][i] = static_cast<scalar_t>(x[k]);
    }
  }
}

// Below this many elements in a whole call, threads cost more than they save.
constexpr int64_t kMinParallelNumel = 1 << 16;

// Spreads the chunks (of all tensors together) over the threads; coeffs[t] holds tensor t's
// per-step coefficients and update(x, coeffs) is the family's per-element math.
template <typename scalar_t, typename Coeffs, typename Update>
void run(const Launch& launch, const std::vector<Coeffs>& coeffs, const Update& update) {
  auto body = [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const Chunk& chunk = launch.chunks[c];
      const TensorJob& job = launch.tensors[chunk.tensor];
      std::array<scalar_t*, kSlots> ptr;
      for (int k = 0; k < kSlots; ++k) {
        ptr[k] = job.ptr[k] ? static_cast<scalar_t*>(job.ptr[k]) + chunk.begin : nullptr;
      }
      const Coeffs& coeff = coeffs[chunk.tensor];
      for_each_element<scalar_t>(ptr, chunk.end - chunk.begin, [&](auto& x) { update(x, coeff); });
    }
  };
  const int64_t n = static_cast<int64_t>(launch.chunks.size());
  if (launch.total_numel < kMinParallelNumel) {
    body(0, n);
  } else {
    at::parallel_for(0, n, 1, body);
  }
}

#define FUSED_OPT_DISPATCH(DTYPE, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, DTYPE, "fused_opt_cpu", __VA_ARGS__)

void adam(const Launch& launch, const AdamOptions& o) {
  FUSED_OPT_DISPATCH(launch.dtype, [&] {
    using S = at::opmath_type<scalar_t>;
    std::vector<AdamCoeffs<S>> coeffs;
    coeffs.reserve(launch.tensors.size());
    for (const auto& t : launch.tensors) coeffs.push_back(adam_coeffs<S>(o, launch.lr, t.step, launch.inv_grad_scale));
    run<scalar_t>(launch, coeffs, [](auto& x, const AdamCoeffs<S>& c) { adam_update(x[0], x[1], x[2], x[3], x[4], c); });
  });
}

void rmsprop(const Launch& launch, const RMSpropOptions& o) {
  FUSED_OPT_DISPATCH(launch.dtype, [&] {
    using S = at::opmath_type<scalar_t>;
    std::vector<RMSpropCoeffs<S>> coeffs(launch.tensors.size(), rmsprop_coeffs<S>(o, launch.lr, launch.inv_grad_scale));
    run<scalar_t>(launch, coeffs, [](auto& x, const RMSpropCoeffs<S>& c) { rmsprop_update(x[0], x[1], x[2], x[3], x[4], c); });
  });
}

void sgd(const Launch& launch, const SGDOptions& o) {
  FUSED_OPT_DISPATCH(launch.dtype, [&] {
    using S = at::opmath_type<scalar_t>;
    std::vector<SGDCoeffs<S>> coeffs(launch.tensors.size(), sgd_coeffs<S>(o, launch.lr, launch.inv_grad_scale));
    run<scalar_t>(launch, coeffs, [](auto& x, const SGDCoeffs<S>& c) { sgd_update(x[0], x[1], x[2], c); });
  });
}

}  // namespace fused_opt::cpu::CPU_CAPABILITY
