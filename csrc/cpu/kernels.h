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

// Runs fn(x) over n elements, where x[k] is slot k's value. Only the slots in Mask (bit k: slot
// k is in use) are loaded, and of those all but slot 1 (the grad) are stored; Mask is a template
// argument so that the loop for each family's slot pattern compiles to straight-line SIMD code.
template <typename scalar_t, int Mask, typename Fn>
void for_each_element(const std::array<scalar_t*, kSlots>& ptr, int64_t n, const Fn& fn) {
  using Vec = at::vec::Vectorized<scalar_t>;
  using opmath_t = at::opmath_type<scalar_t>;
  using OVec = at::vec::Vectorized<opmath_t>;
  constexpr auto loaded = [](int k) { return ((Mask >> k) & 1) != 0; };
  constexpr auto stored = [](int k) { return ((Mask >> k) & 1) != 0 && k != 1; };
  constexpr int64_t width = Vec::size();
  int64_t i = 0;
  for (; i + width <= n; i += width) {
    if constexpr (is_16bit<scalar_t>) {
      std::array<OVec, kSlots> lo, hi;
      for (int k = 0; k < kSlots; ++k) {
        if (loaded(k)) std::tie(lo[k], hi[k]) = at::vec::convert_to_float<scalar_t>(Vec::loadu(ptr[k] + i));
      }
      fn(lo);
      fn(hi);
      for (int k = 0; k < kSlots; ++k) {
        if (stored(k)) at::vec::convert_from_float<scalar_t>(lo[k], hi[k]).store(ptr[k] + i);
      }
    } else {
      std::array<OVec, kSlots> x;
      for (int k = 0; k < kSlots; ++k) {
        if (loaded(k)) x[k] = OVec::loadu(ptr[k] + i);
      }
      fn(x);
      for (int k = 0; k < kSlots; ++k) {
        if (stored(k)) x[k].store(ptr[k] + i);
      }
    }
  }
  for (; i < n; ++i) {
    std::array<opmath_t, kSlots> x{};
    for (int k = 0; k < kSlots; ++k) {
      if (loaded(k)) x[k] = static_cast<opmath_t>(ptr[k][i]);
    }
    fn(x);
    for (int k = 0; k < kSlots; ++k) {
      if (stored(k)) ptr[k][i] = static_cast<scalar_t>(x[k]);
    }
  }
}

// Below this many elements in a whole call, threads cost more than they save.
constexpr int64_t kMinParallelNumel = 1 << 16;

// Spreads the chunks (of all tensors together) over the threads; coeffs[t] holds tensor t's
// per-step coefficients and update(x, coeffs) is the family's per-element math.
template <typename scalar_t, int Mask, typename Coeffs, typename Update>
void run_masked(const Launch& launch, const std::vector<Coeffs>& coeffs, const Update& update) {
  auto body = [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const Chunk& chunk = launch.chunks[c];
      const TensorJob& job = launch.tensors[chunk.tensor];
      std::array<scalar_t*, kSlots> ptr;
      for (int k = 0; k < kSlots; ++k) {
        ptr[k] = job.ptr[k] ? static_cast<scalar_t*>(job.ptr[k]) + chunk.begin : nullptr;
      }
      const Coeffs& coeff = coeffs[chunk.tensor];
      for_each_element<scalar_t, Mask>(ptr, chunk.end - chunk.begin, [&](auto& x) { update(x, coeff); });
    }
  };
  const int64_t n = static_cast<int64_t>(launch.chunks.size());
  if (launch.total_numel < kMinParallelNumel) {
    body(0, n);
  } else {
    at::parallel_for(0, n, 1, body);
  }
}

// The slot patterns the three families use: param+grad (SGD), +1 state (SGD momentum, RMSprop),
// +2 (Adam, RMSprop centered), slots 0-2 and 4 (RMSprop momentum), all five (Adam amsgrad,
// RMSprop centered with momentum).
template <typename scalar_t, typename Coeffs, typename Update>
void run(const Launch& launch, const std::vector<Coeffs>& coeffs, const Update& update) {
  switch (launch.slot_mask) {
    case 0b00011: return run_masked<scalar_t, 0b00011>(launch, coeffs, update);
    case 0b00111: return run_masked<scalar_t, 0b00111>(launch, coeffs, update);
    case 0b01111: return run_masked<scalar_t, 0b01111>(launch, coeffs, update);
    case 0b10111: return run_masked<scalar_t, 0b10111>(launch, coeffs, update);
    case 0b11111: return run_masked<scalar_t, 0b11111>(launch, coeffs, update);
    default: TORCH_CHECK(false, "fused_opt: unexpected state slot pattern ", launch.slot_mask);
  }
}

#define FUSED_OPT_DISPATCH(DTYPE, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, DTYPE, "fused_opt_cpu", __VA_ARGS__)

void adam(const Launch& launch, const AdamOptions& o) {
  FUSED_OPT_DISPATCH(launch.dtype, [&] {
    using S = at::opmath_type<scalar_t>;
    std::vector<AdamCoeffs<S>> coeffs;
    coeffs.reserve(launch.tensors.size());
    for (const auto& t : launch.tensors) {  // params usually share a step: compute the pow()s once
      const bool same = !coeffs.empty() && t.step == (&t - 1)->step;
      coeffs.push_back(same ? coeffs.back() : adam_coeffs<S>(o, launch.lr, t.step, launch.inv_grad_scale));
    }
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
