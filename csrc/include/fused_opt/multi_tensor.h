// Multi-tensor traversal of the CUDA kernels, written as host+device code so that the CPU
// simulation (csrc/cpu/cuda_sim.cpp) runs the very same chunking, index and vector-load logic
// over simulated blocks and threads, and the tests can check it without a GPU.
//
// A launch covers up to kMaxTensors tensors and kMaxBlocks blocks; each block updates one chunk
// of kChunk elements of one tensor. All the metadata travels in the kernel's arguments.
#pragma once

#include <cstdint>
#include <type_traits>

#include "fused_opt/math.h"

namespace fused_opt::mta {

constexpr int kSlots = 5;           // 0 param, 1 grad (read only), 2..4 state (null if unused)
constexpr int kMaxTensors = 36;
constexpr int kMaxBlocks = 320;
constexpr int64_t kChunk = 65536;   // elements per block
constexpr int kThreads = 512;       // threads per block
constexpr int kVectorBytes = 16;    // one 128-bit load/store per slot per iteration

struct Meta {
  void* addr[kSlots][kMaxTensors];
  int64_t numel[kMaxTensors];
  double step_host[kMaxTensors];         // the step of this update, when counters live on the host
  const float* step_dev[kMaxTensors];    // or a device counter, already advanced (null: use host)
  unsigned char block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};

// Per-launch scalars: lr / grad_scale / found_inf may be device tensors (AMP, CUDA graphs).
struct Scalars {
  double lr;
  const float* lr_dev;       // overrides lr when set
  const float* grad_scale;   // grads are divided by it when set
  const float* found_inf;    // the whole update is skipped when set and non-zero
  double inv_scale_host;     // 1 / grad_scale when the scale is known on the host
};

template <typename T>
struct alignas(kVectorBytes) Pack {
  static constexpr int n = kVectorBytes / sizeof(T);
  T v[n];
};

// The work of thread `thread` of block `block`: compute the tensor's coefficients, then walk
// the chunk with vector loads when every slot is 16-byte aligned and the length is a multiple
// of the vector width, else element by element with a bounds mask.
template <typename scalar_t, typename Family>
FO_HD void process_block(const Meta& meta, const Scalars& s, const Family& family, int block, int thread,
                         int nthreads) {
  using S = typename Family::template opmath<scalar_t>;
  if (s.found_inf && *s.found_inf != 0.0f) return;
  const int t = meta.block_tensor[block];
  const int64_t begin = int64_t(meta.block_chunk[block]) * kChunk;
  const int64_t len = meta.numel[t] - begin < kChunk ? meta.numel[t] - begin : kChunk;
  const double lr = s.lr_dev ? double(*s.lr_dev) : s.lr;
  const double inv_scale = s.grad_scale ? 1.0 / double(*s.grad_scale) : s.inv_scale_host;
  const double step = meta.step_dev[t] ? double(*meta.step_dev[t]) : meta.step_host[t];
  const auto coeffs = family.template coeffs<S>(lr, step, inv_scale);

  scalar_t* ptr[kSlots];
  bool aligned = len % Pack<scalar_t>::n == 0;
  for (int k = 0; k < kSlots; ++k) {
    ptr[k] = meta.addr[k][t] ? static_cast<scalar_t*>(meta.addr[k][t]) + begin : nullptr;
    aligned = aligned && (reinterpret_cast<uintptr_t>(ptr[k]) % kVectorBytes == 0);
  }
  constexpr int W = Pack<scalar_t>::n;
  if (aligned) {
    for (int64_t i = int64_t(thread) * W; i < len; i += int64_t(nthreads) * W) {
      Pack<scalar_t> pack[kSlots];
      for (int k = 0; k < kSlots; ++k) {
        if (ptr[k]) pack[k] = *reinterpret_cast<const Pack<scalar_t>*>(ptr[k] + i);
      }
      for (int j = 0; j < W; ++j) {
        S x[kSlots];
        for (int k = 0; k < kSlots; ++k) x[k] = ptr[k] ? S(pack[k].v[j]) : S(0);
        family.update(x, coeffs);
        for (int k = 0; k < kSlots; ++k) pack[k].v[j] = scalar_t(x[k]);
      }
      for (int k = 0; k < kSlots; ++k) {
        if (ptr[k] && k != 1) *reinterpret_cast<Pack<scalar_t>*>(ptr[k] + i) = pack[k];
      }
    }
  } else {
    for (int64_t i = thread; i < len; i += nthreads) {
      S x[kSlots];
      for (int k = 0; k < kSlots; ++k) x[k] = ptr[k] ? S(ptr[k][i]) : S(0);
      family.update(x, coeffs);
      for (int k = 0; k < kSlots; ++k) {
        if (ptr[k] && k != 1) ptr[k][i] = scalar_t(x[k]);
      }
    }
  }
}

// The three families as functors of (coefficients, element update) for process_block.
template <typename T>
using opmath_of = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

struct AdamFamily {
  AdamOptions o;
  template <typename T> using opmath = opmath_of<T>;
  template <typename S> FO_HD AdamCoeffs<S> coeffs(double lr, double step, double inv_scale) const {
    return adam_coeffs<S>(o, lr, step, inv_scale);
  }
  template <typename S> FO_HD void update(S* x, const AdamCoeffs<S>& c) const { adam_update(x[0], x[1], x[2], x[3], x[4], c); }
};

struct RMSpropFamily {
  RMSpropOptions o;
  template <typename T> using opmath = opmath_of<T>;
  template <typename S> FO_HD RMSpropCoeffs<S> coeffs(double lr, double, double inv_scale) const {
    return rmsprop_coeffs<S>(o, lr, inv_scale);
  }
  template <typename S> FO_HD void update(S* x, const RMSpropCoeffs<S>& c) const { rmsprop_update(x[0], x[1], x[2], x[3], x[4], c); }
};

struct SGDFamily {
  SGDOptions o;
  template <typename T> using opmath = opmath_of<T>;
  template <typename S> FO_HD SGDCoeffs<S> coeffs(double lr, double, double inv_scale) const {
    return sgd_coeffs<S>(o, lr, inv_scale);
  }
  template <typename S> FO_HD void update(S* x, const SGDCoeffs<S>& c) const { sgd_update(x[0], x[1], x[2], c); }
};

// Host side: packs tensors and their chunks into Meta and calls launch(meta, nblocks) each time a
// launch is full, and once at the end. `addr(t, k)`, `numel(t)`, `step_host(t)`, `step_dev(t)`
// describe tensor t of n.
template <typename Describe, typename Launch>
void for_each_launch(int n, const Describe& d, const Launch& launch) {
  Meta meta{};
  int tensors = 0, blocks = 0;
  for (int t = 0; t < n; ++t) {
    const int64_t numel = d.numel(t);
    if (numel == 0) continue;
    for (int k = 0; k < kSlots; ++k) meta.addr[k][tensors] = d.addr(t, k);
    meta.numel[tensors] = numel;
    meta.step_host[tensors] = d.step_host(t);
    meta.step_dev[tensors] = d.step_dev(t);
    const int64_t chunks = (numel + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_tensor[blocks] = static_cast<unsigned char>(tensors);
      meta.block_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
      const bool tensors_full = tensors + 1 == kMaxTensors && c + 1 == chunks;
      if (blocks == kMaxBlocks || tensors_full) {
        launch(meta, blocks);
        blocks = 0;
        if (c + 1 < chunks) {  // the tensor goes on in the next launch, in slot 0
          for (int k = 0; k < kSlots; ++k) meta.addr[k][0] = meta.addr[k][tensors];
          meta.numel[0] = meta.numel[tensors];
          meta.step_host[0] = meta.step_host[tensors];
          meta.step_dev[0] = meta.step_dev[tensors];
          tensors = 0;
        } else {
          tensors = -1;  // becomes 0 below
        }
      }
    }
    ++tensors;
  }
  if (blocks > 0) launch(meta, blocks);
}

}  // namespace fused_opt::mta
