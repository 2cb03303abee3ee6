// Per-element update math of every family, written once.
//
// The same templates run in three places: the CPU kernels (V = at::vec::Vectorized<opmath> for
// the body, V = opmath scalar for the tail), the CUDA kernels (V = float or double) and the CPU
// simulation of the CUDA traversal used by the tests. Coefficients that depend only on the step
// and the hyperparameters are computed once per tensor (in double, then rounded to the opmath
// type S, as torch.optim does with its Python floats) by the *_coeffs functions below.
#pragma once

#include <cmath>

// Always inlined: the per-element math must fold into each kernel's loop (called out of line, its
// vector arguments go through memory).
#if defined(__CUDACC__) || defined(__HIPCC__)
#define FO_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define FO_HD inline __attribute__((always_inline))
#else
#define FO_HD inline
#endif

namespace fused_opt {

// Elementwise helpers that differ between scalar and vector types. Specialised for
// at::vec::Vectorized in csrc/cpu/vec_ops.h. max/min propagate NaN, like torch.maximum.
template <typename V>
struct Ops;

template <typename S>
struct ScalarOps {
  FO_HD static S sqrt(S x) { return ::sqrt(x); }
  FO_HD static S max(S a, S b) { return (a != a || a > b) ? a : b; }
  FO_HD static S sign(S x) { return S((x > S(0)) - (x < S(0))); }
  // Soft threshold written as p - clamp(p, -t, t): exact zeros inside [-t, t], NaN stays NaN.
  FO_HD static S shrink(S p, S t) { return p - (p > t ? t : (p < -t ? -t : p)); }
};
template <>
struct Ops<float> : ScalarOps<float> {
  FO_HD static float sqrt(float x) { return ::sqrtf(x); }
};
template <>
struct Ops<double> : ScalarOps<double> {};

// Options shared by every family: the gradient transform and the L1/L2 terms.
template <typename S>
struct GradTerms {
  S grad_mul;            // -1 for maximize, times 1/grad_scale under AMP
  bool scale_grad;       // grad_mul != 1
  S weight_decay;        // coupled L2: g += wd * p
  bool coupled_l2;
  S decay;               // decoupled L2: p *= 1 - lr * wd
  bool decoupled_l2;
  S l1;                  // L1 subgradient: g += l1 * sign(p)
  bool l1_subgradient;
  S l1_threshold;        // L1 proximal: p = shrink(p, lr * l1) after the update
  bool l1_proximal;
};

struct GradOptions {
  bool maximize;
  double weight_decay;
  bool decoupled;
  double l1;
  bool l1_proximal;
};

template <typename S>
FO_HD GradTerms<S> grad_terms(const GradOptions& o, double lr, double inv_grad_scale) {
  GradTerms<S> t;
  double mul = (o.maximize ? -1.0 : 1.0) * inv_grad_scale;
  t.grad_mul = S(mul);
  t.scale_grad = mul != 1.0;
  t.weight_decay = S(o.weight_decay);
  t.coupled_l2 = o.weight_decay != 0.0 && !o.decoupled;
  t.decay = S(1.0 - lr * o.weight_decay);
  t.decoupled_l2 = o.weight_decay != 0.0 && o.decoupled;
  t.l1 = S(o.l1);
  t.l1_subgradient = o.l1 != 0.0 && !o.l1_proximal;
  t.l1_threshold = S(lr * o.l1);
  t.l1_proximal = o.l1 != 0.0 && o.l1_proximal;
  return t;
}

// Everything that happens to g before the family's own update, and to p before it (decoupled L2).
template <typename V, typename S>
FO_HD V prepare_grad(V& p, V g, const GradTerms<S>& t) {
  if (t.scale_grad) g = g * V(t.grad_mul);
  if (t.coupled_l2) g = g + V(t.weight_decay) * p;
  if (t.l1_subgradient) g = g + V(t.l1) * Ops<V>::sign(p);
  if (t.decoupled_l2) p = p * V(t.decay);
  return g;
}

template <typename V, typename S>
FO_HD void finish_param(V& p, const GradTerms<S>& t) {
  if (t.l1_proximal) p = Ops<V>::shrink(p, V(t.l1_threshold));
}

// torch.lerp's formula (two forms, chosen by the weight), so moving averages match bit for bit.
template <typename V, typename S>
FO_HD V lerp_avg(V a, V b, S w) {
  return w < S(0.5) ? a + V(w) * (b - a) : b - (b - a) * V(S(1) - w);
}

// ---------------------------------------------------------------- Adam / AdamW
struct AdamOptions {
  double beta1, beta2, eps;
  bool amsgrad;
  GradOptions grad;
};

template <typename S>
struct AdamCoeffs {
  GradTerms<S> terms;
  S beta1_weight;   // 1 - beta1, the lerp weight
  S beta2, one_minus_beta2, eps;
  S neg_step_size;  // -lr / (1 - beta1^t)
  S bias_correction2_sqrt;
  bool amsgrad;
};

template <typename S>
FO_HD AdamCoeffs<S> adam_coeffs(const AdamOptions& o, double lr, double step, double inv_grad_scale) {
  AdamCoeffs<S> c;
  c.terms = grad_terms<S>(o.grad, lr, inv_grad_scale);
  c.beta1_weight = S(1.0 - o.beta1);
  c.beta2 = S(o.beta2);
  c.one_minus_beta2 = S(1.0 - o.beta2);
  c.eps = S(o.eps);
  c.neg_step_size = S(-(lr / (1.0 - ::pow(o.beta1, step))));
  c.bias_correction2_sqrt = S(::sqrt(1.0 - ::pow(o.beta2, step)));
  c.amsgrad = o.amsgrad;
  return c;
}

template <typename V, typename S>
FO_HD void adam_update(V& p, V g, V& exp_avg, V& exp_avg_sq, V& max_exp_avg_sq, const AdamCoeffs<S>& c) {
  g = prepare_grad(p, g, c.terms);
  exp_avg = lerp_avg(exp_avg, g, c.beta1_weight);
  exp_avg_sq = exp_avg_sq * V(c.beta2) + V(c.one_minus_beta2) * g * g;
  V second = exp_avg_sq;
  if (c.amsgrad) {
    max_exp_avg_sq = Ops<V>::max(max_exp_avg_sq, exp_avg_sq);
    second = max_exp_avg_sq;
  }
  V denom = Ops<V>::sqrt(second) / V(c.bias_correction2_sqrt) + V(c.eps);
  p = p + V(c.neg_step_size) * exp_avg / denom;  // torch's addcdiv: (value * t1) / t2
  finish_param(p, c.terms);
}

// ---------------------------------------------------------------- RMSprop
struct RMSpropOptions {
  double alpha, eps, momentum;
  bool centered;
  GradOptions grad;
};

template <typename S>
struct RMSpropCoeffs {
  GradTerms<S> terms;
  S alpha, one_minus_alpha, eps, momentum, neg_lr;
  bool centered, use_momentum;
};

template <typename S>
FO_HD RMSpropCoeffs<S> rmsprop_coeffs(const RMSpropOptions& o, double lr, double inv_grad_scale) {
  RMSpropCoeffs<S> c;
  c.terms = grad_terms<S>(o.grad, lr, inv_grad_scale);
  c.alpha = S(o.alpha);
  c.one_minus_alpha = S(1.0 - o.alpha);
  c.eps = S(o.eps);
  c.momentum = S(o.momentum);
  c.neg_lr = S(-lr);
  c.centered = o.centered;
  c.use_momentum = o.momentum > 0.0;
  return c;
}

template <typename V, typename S>
FO_HD void rmsprop_update(V& p, V g, V& square_avg, V& grad_avg, V& momentum_buffer, const RMSpropCoeffs<S>& c) {
  g = prepare_grad(p, g, c.terms);
  square_avg = square_avg * V(c.alpha) + V(c.one_minus_alpha) * g * g;
  V avg;
  if (c.centered) {
    grad_avg = lerp_avg(grad_avg, g, c.one_minus_alpha);
    avg = Ops<V>::sqrt(square_avg - grad_avg * grad_avg);
  } else {
    avg = Ops<V>::sqrt(square_avg);
  }
  avg = avg + V(c.eps);
  if (c.use_momentum) {
    momentum_buffer = momentum_buffer * V(c.momentum) + g / avg;
    p = p + V(c.neg_lr) * momentum_buffer;
  } else {
    p = p + V(c.neg_lr) * g / avg;  // torch's addcdiv: (value * t1) / t2
  }
  finish_param(p, c.terms);
}

// ---------------------------------------------------------------- SGD
struct SGDOptions {
  double momentum, dampening;
  bool nesterov;
  bool first_step;  // momentum buffers are fresh: buf = g, as torch.optim.SGD's clone
  GradOptions grad;
};

template <typename S>
struct SGDCoeffs {
  GradTerms<S> terms;
  S momentum, one_minus_dampening, neg_lr;
  bool use_momentum, nesterov, first_step;
};

template <typename S>
FO_HD SGDCoeffs<S> sgd_coeffs(const SGDOptions& o, double lr, double inv_grad_scale) {
  SGDCoeffs<S> c;
  c.terms = grad_terms<S>(o.grad, lr, inv_grad_scale);
  c.momentum = S(o.momentum);
  c.one_minus_dampening = S(1.0 - o.dampening);
  c.neg_lr = S(-lr);
  c.use_momentum = o.momentum != 0.0;
  c.nesterov = o.nesterov;
  c.first_step = o.first_step;
  return c;
}

template <typename V, typename S>
FO_HD void sgd_update(V& p, V g, V& momentum_buffer, const SGDCoeffs<S>& c) {
  g = prepare_grad(p, g, c.terms);
  if (c.use_momentum) {
    momentum_buffer = c.first_step ? g : momentum_buffer * V(c.momentum) + V(c.one_minus_dampening) * g;
    g = c.nesterov ? g + V(c.momentum) * momentum_buffer : momentum_buffer;
  }
  p = p + V(c.neg_lr) * g;
  finish_param(p, c.terms);
}

}  // namespace fused_opt
