// Ops<> for at::vec::Vectorized, so math.h's templates run on whole SIMD registers.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "fused_opt/math.h"

namespace fused_opt {

template <typename T>
struct Ops<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static V sqrt(const V& x) { return x.sqrt(); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static V sign(const V& x) {
    const V zero(T(0)), one(T(1));
    return ((x > zero) & one) - ((x < zero) & one);
  }
  static V shrink(const V& p, const V& t) {
    return p - at::vec::minimum(at::vec::maximum(p, V(T(0)) - t), t);
  }
};

}  // namespace fused_opt
