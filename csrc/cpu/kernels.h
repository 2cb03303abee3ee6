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

#include <tuple>
#include <type_traits>

#include "launch.h"
#include "vec_ops.h"

namespace fused_opt::cpu::CPU_CAPABILITY {

// The per-element lambdas must fold into each loop: called out of line, their vector arguments go
// through memory (GCC stopped inlining them once each had ten loops to serve, not five).
#if defined(__GNUC__)
#define FUSED_OPT_INLINE __attribute__((always_inline))
#else
#define FUSED_OPT_INLINE
#endif

template <typename scalar_t>
constexpr bool is_16bit = std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>;

// The states' element type: float32 with master weights (Master), else the params' scalar_t.
// On x86 the generic build's Vectorized is an array of floats, which GCC's SLP vectoriser turns into
// SSE code for some loop bodies and not for others (SGD came out scalar, 3.6x torch's generic
// kernel); its loop vectoriser does better with the plain per-element loop, so that build runs only
// the element loop there. On Arm the generic build's Vectorized is NEON code: it keeps the vector body.
#if defined(__x86_64__) && !defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
constexpr bool kVectorBody = false;
#else
constexpr bool kVectorBody = true;
#endif

template <typename scalar_t, bool Master>
using state_type = std::conditional_t<Master, float, scalar_t>;

// Loads and stores of one slot as opmath vectors: 16-bit types convert to and from two float
// vectors; float32 in a 16-bit loop (master weights) is two plain float vectors.
template <typename scalar_t, typename T>
struct SlotIO {
  using OVec = at::vec::Vectorized<at::opmath_type<scalar_t>>;
  static std::tuple<OVec, OVec> load(const T* p) {
    if constexpr (is_16bit<T>) {
      return at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
    } else {
      return {OVec::loadu(p), OVec::loadu(p + OVec::size())};
    }
  }
  static void store(T* p, const OVec& lo, const OVec& hi) {
    if constexpr (is_16bit<T>) {
      at::vec::convert_from_float<T>(lo, hi).store(p);
    } else {
      lo.store(p);
      hi.store(p + OVec::size());
    }
  }
};

// Which slots a loop touches, from its Mask (bit k: slot k is in use; bit kMaster: master
// weights). All but slot 1 (the grad) are stored; with master weights x[0] is the master's
// value, so the param itself is written (rounded from it) but never read from its own slot.
template <int Mask>
struct Slots {
  static constexpr bool master = ((Mask >> kMaster) & 1) != 0;
  static constexpr bool in_use(int k) { return ((Mask >> k) & 1) != 0; }
  static constexpr bool loaded(int k) { return in_use(k) && !(master && k == 0); }
  static constexpr bool stored(int k) { return in_use(k) && k != 1; }
};

// Runs fn(x) over n elements from element `begin` on, where x[k] is slot k's value (in opmath).
// Mask is a template argument so that the loop for each family's slot pattern compiles to
// straight-line SIMD code. Slots 0-1 hold scalar_t, the states state_t (float32 with master
// weights, else scalar_t), the master copy float32.
template <typename scalar_t, int Mask, typename Fn>
void for_each_element(const Pointers& base, int64_t begin, int64_t n, const Fn& fn_ref) {
  // A local copy of fn and the coefficients it holds: the stores below go through may-alias vector
  // types, after which the compiler would reload every coefficient and flag through a reference
  // each iteration (measured: bf16 Adam 14% slower than torch's fused kernel).
  const Fn fn = fn_ref;
  using Vec = at::vec::Vectorized<scalar_t>;
  using opmath_t = at::opmath_type<scalar_t>;
  using OVec = at::vec::Vectorized<opmath_t>;
  using S = Slots<Mask>;
  using state_t = state_type<scalar_t, S::master>;
  static_assert(!S::master || is_16bit<scalar_t>, "master weights are for 16-bit params");
  std::array<scalar_t*, 2> own;  // param, grad
  std::array<state_t*, kSlots - 2> states;
  for (int k = 0; k < 2; ++k) own[k] = static_cast<scalar_t*>(base[k]) + begin;
  for (int k = 2; k < kSlots; ++k) states[k - 2] = static_cast<state_t*>(base[k]) + begin;
  float* master = static_cast<float*>(base[kMaster]) + begin;
  constexpr int64_t width = Vec::size();
  int64_t i = 0;
  for (; kVectorBody && i + width <= n; i += width) {
    if constexpr (is_16bit<scalar_t>) {
      std::array<OVec, kSlots> lo, hi;
      for (int k = 0; k < 2; ++k) {
        if (S::loaded(k)) std::tie(lo[k], hi[k]) = SlotIO<scalar_t, scalar_t>::load(own[k] + i);
      }
      for (int k = 2; k < kSlots; ++k) {
        if (S::loaded(k)) std::tie(lo[k], hi[k]) = SlotIO<scalar_t, state_t>::load(states[k - 2] + i);
      }
      if constexpr (S::master) std::tie(lo[0], hi[0]) = SlotIO<scalar_t, float>::load(master + i);
      fn(lo);
      fn(hi);
      // States before the param, in torch's order: measured 6% faster for bf16 Adam on AVX2
      // (gpt2-small, 1.10-1.16x torch fused before, 1.03-1.08x after).
      for (int k = 2; k < kSlots; ++k) {
        if (S::stored(k)) SlotIO<scalar_t, state_t>::store(states[k - 2] + i, lo[k], hi[k]);
      }
      if constexpr (S::master) SlotIO<scalar_t, float>::store(master + i, lo[0], hi[0]);
      if (S::stored(0)) SlotIO<scalar_t, scalar_t>::store(own[0] + i, lo[0], hi[0]);
    } else {
      std::array<OVec, kSlots> x;
      for (int k = 0; k < 2; ++k) {
        if (S::loaded(k)) x[k] = OVec::loadu(own[k] + i);
      }
      for (int k = 2; k < kSlots; ++k) {
        if (S::loaded(k)) x[k] = OVec::loadu(states[k - 2] + i);
      }
      fn(x);
      for (int k = 2; k < kSlots; ++k) {
        if (S::stored(k)) x[k].store(states[k - 2] + i);
      }
      if (S::stored(0)) x[0].store(own[0] + i);
    }
  }
  for (; i < n; ++i) {
    std::array<opmath_t, kSlots> x{};
    for (int k = 0; k < 2; ++k) {
      if (S::loaded(k)) x[k] = static_cast<opmath_t>(own[k][i]);
    }
    for (int k = 2; k < kSlots; ++k) {
      if (S::loaded(k)) x[k] = static_cast<opmath_t>(states[k - 2][i]);
    }
    if constexpr (S::master) x[0] = master[i];
    fn(x);
    if constexpr (S::master) master[i] = x[0];
    if (S::stored(0)) own[0][i] = static_cast<scalar_t>(x[0]);
    for (int k = 2; k < kSlots; ++k) {
      if (S::stored(k)) states[k - 2][i] = static_cast<state_t>(x[k]);
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
      const Coeffs& coeff = coeffs[chunk.tensor];
      for_each_element<scalar_t, Mask>(job.ptr, chunk.begin, chunk.end - chunk.begin,
                                       [&update, coeff](auto& x) FUSED_OPT_INLINE { update(x, coeff); });
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
// RMSprop centered with momentum); each also with master weights for 16-bit params.
template <typename scalar_t, typename Coeffs, typename Update>
void run(const Launch& launch, const std::vector<Coeffs>& coeffs, const Update& update) {
  constexpr int M = 1 << kMaster;
  if constexpr (is_16bit<scalar_t>) {
    switch (launch.slot_mask) {
      case M | 0b00011: return run_masked<scalar_t, M | 0b00011>(launch, coeffs, update);
      case M | 0b00111: return run_masked<scalar_t, M | 0b00111>(launch, coeffs, update);
      case M | 0b01111: return run_masked<scalar_t, M | 0b01111>(launch, coeffs, update);
      case M | 0b10111: return run_masked<scalar_t, M | 0b10111>(launch, coeffs, update);
      case M | 0b11111: return run_masked<scalar_t, M | 0b11111>(launch, coeffs, update);
      default: break;
    }
  }
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
    run<scalar_t>(launch, coeffs, [](auto& x, const AdamCoeffs<S>& c) FUSED_OPT_INLINE { adam_update(x[0], x[1], x[2], x[3], x[4], c); });
  });
}

void rmsprop(const Launch& launch, const RMSpropOptions& o) {
  FUSED_OPT_DISPATCH(launch.dtype, [&] {
    using S = at::opmath_type<scalar_t>;
    std::vector<RMSpropCoeffs<S>> coeffs(launch.tensors.size(), rmsprop_coeffs<S>(o, launch.lr, launch.inv_grad_scale));
    run<scalar_t>(launch, coeffs, [](auto& x, const RMSpropCoeffs<S>& c) FUSED_OPT_INLINE { rmsprop_update(x[0], x[1], x[2], x[3], x[4], c); });
  });
}

void sgd(const Launch& launch, const SGDOptions& o) {
  FUSED_OPT_DISPATCH(launch.dtype, [&] {
    using S = at::opmath_type<scalar_t>;
    std::vector<SGDCoeffs<S>> coeffs(launch.tensors.size(), sgd_coeffs<S>(o, launch.lr, launch.inv_grad_scale));
    run<scalar_t>(launch, coeffs, [](auto& x, const SGDCoeffs<S>& c) FUSED_OPT_INLINE { sgd_update(x[0], x[1], x[2], c); });
  });
}

}  // namespace fused_opt::cpu::CPU_CAPABILITY
