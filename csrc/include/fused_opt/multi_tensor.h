// Multi-tensor traversal of the CUDA kernels, written as host+device code so that the CPU
// simulation (csrc/cpu/cuda_sim.cpp) runs the very same chunking, index and vector-load logic
// over simulated blocks and threads, and the tests can check it without a GPU.
//
// A launch covers up to Limits::tensors tensors and Limits::blocks blocks; each block updates one
// chunk of kChunk elements of one tensor. All the metadata travels in the kernel's arguments,
// which may hold up to 32 KB since CUDA 12.1 on sm_70+ (this project builds sm_80/sm_90 with nvcc
// 13): 256 tensors and 2560 blocks a launch, so a GPT-shaped 1.1B-param list steps in 7 launches
// and 10,000 tensors of 4,096 elements in 40, with nothing copied to the device per step and
// every launch capturable in a CUDA graph.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include "fused_opt/math.h"

namespace fused_opt::mta {

constexpr int kSlots = 6;           // 0 param, 1 grad (read only), 2..4 state, 5 master (null if unused)
constexpr int kMaster = 5;          // the float32 master copy of a 16-bit param
constexpr int kMaxTensors = 256;    // with kMaxBlocks, keeps the arguments under 32 KB (below)
constexpr int kMaxBlocks = 2560;
constexpr int64_t kChunk = 65536;   // elements per block
constexpr int kThreads = 512;       // threads per block
constexpr int kVectorBytes = 16;    // one 128-bit load/store per slot per iteration

struct Meta {
  void* addr[kSlots][kMaxTensors];
  int64_t numel[kMaxTensors];
  double step_host[kMaxTensors];         // the step of this update, when counters live on the host
  const float* step_dev[kMaxTensors];    // or a device counter, already advanced (null: use host)
  unsigned char block_tensor[kMaxBlocks];  // kMaxTensors <= 256
  int32_t block_chunk[kMaxBlocks];
};

// Per-launch scalars: lr / weight decay / grad_scale / found_inf may be device tensors (AMP, CUDA graphs).
struct Scalars {
  double lr;
  const float* lr_dev;       // overrides lr when set
  const float* grad_scale;   // grads are divided by it when set
  const float* found_inf;    // the whole update is skipped when set and non-zero
  double inv_scale_host;     // 1 / grad_scale when the scale is known on the host
  const float* weight_decay_dev;  // overrides the family's weight decay when set
};
// A kernel's arguments (Meta, Scalars, the family's options: under 128 bytes) must fit in the
// 32,764 bytes CUDA allows.
static_assert(sizeof(Meta) + sizeof(Scalars) + 128 <= 32764, "launch metadata over the kernel argument limit");
static_assert(kMaxTensors <= 256, "block_tensor holds a tensor's slot in one byte");

// Step counters that live on the device (float32, one 0-d tensor per param) advance before the
// update, in launches of their own: one thread per counter, up to kMaxCounters pointers in the
// arguments. 10,000 counters take 3 launches (torch's foreach add, which torch's fused optimizers
// use, takes 91). The add is the foreach add's: step + increment in float32, the increment being 1,
// or 1 - found_inf read on the device (no host sync; a skipped step then counts nothing).
constexpr int kMaxCounters = 4000;
constexpr int kCounterThreads = 256;

struct Counters {
  float* step[kMaxCounters];
  const float* found_inf;  // when set, the increment is 1 - *found_inf
  int n;
  float sign;  // +1 advances; -1 puts back what the same call advanced
};
static_assert(sizeof(Counters) <= 32764, "counter pointers over the kernel argument limit");

// Thread `thread` of counter block `block` advances counter block * nthreads + thread, if any.
FO_HD void advance_counter(const Counters& c, int block, int thread, int nthreads) {
  const int i = block * nthreads + thread;
  if (i >= c.n) return;
  const float increment = c.found_inf ? 1.0f - *c.found_inf : 1.0f;
  *c.step[i] += c.sign * increment;
}

// How much of Meta (and of Counters) a launch fills: the GPU fills it all; the CPU simulation uses
// less, so that tests of CPU-sized tensors cross launch boundaries.
struct Limits {
  int tensors = kMaxTensors;
  int blocks = kMaxBlocks;
  int counters = kMaxCounters;
};

// A family's options with another weight decay (read from a tensor at run time).
template <typename Family>
FO_HD Family with_weight_decay(Family family, double weight_decay) {
  family.o.grad.weight_decay = weight_decay;
  return family;
}

// W elements of one slot, moved by 16-byte vector loads/stores (two for float32 slots in a
// 16-bit loop).
template <typename T, int W>
struct alignas(kVectorBytes) Pack {
  T v[W];
};

// Slot k's element type: params and grads are scalar_t; with master weights (Master) the states
// and the master copy are float32.
template <typename scalar_t, bool Master>
FO_HD constexpr bool slot_is_float(int k) {
  return k == kMaster || (Master && k >= 2);
}

// A GPU faults on a vector load or store at an address that is not a multiple of 16 bytes (and the
// fault ends the process's CUDA context); the CPU would not, so the CPU simulation checks each one.
FO_HD void expect_vector_aligned(const void* p) {
#if !defined(__CUDA_ARCH__)
  if (reinterpret_cast<uintptr_t>(p) % kVectorBytes != 0) {
    throw std::logic_error("fused_opt (cuda_sim): a 16-byte vector load or store at an unaligned address");
  }
#endif
}

template <typename T, int W, typename S>
FO_HD void load_pack(const void* p, int64_t i, S* out) {
  const T* at = static_cast<const T*>(p) + i;
  expect_vector_aligned(at);
  const Pack<T, W> pack = *reinterpret_cast<const Pack<T, W>*>(at);
  for (int j = 0; j < W; ++j) out[j] = S(pack.v[j]);
}

template <typename T, int W, typename S>
FO_HD void store_pack(void* p, int64_t i, const S* in) {
  T* at = static_cast<T*>(p) + i;
  expect_vector_aligned(at);
  Pack<T, W> pack;
  for (int j = 0; j < W; ++j) pack.v[j] = T(in[j]);
  *reinterpret_cast<Pack<T, W>*>(at) = pack;
}

// The work of thread `thread` of block `block`: compute the tensor's coefficients, then walk
// the chunk: when every slot is 16-byte aligned, with vector loads up to the last whole vector
// and element by element after it (the tail); else element by element throughout. With master
// weights the math runs on the master's value (x[0] = master; the param is written, rounded,
// never read).
template <typename scalar_t, bool Master, typename Family>
FO_HD void process_block(const Meta& meta, const Scalars& s, const Family& family, int block, int thread,
                         int nthreads) {
  using S = typename Family::template opmath<scalar_t>;
  constexpr int W = kVectorBytes / sizeof(scalar_t);
  if (s.found_inf && *s.found_inf != 0.0f) return;
  const int t = meta.block_tensor[block];
  const int64_t begin = int64_t(meta.block_chunk[block]) * kChunk;
  const int64_t len = meta.numel[t] - begin < kChunk ? meta.numel[t] - begin : kChunk;
  const double lr = s.lr_dev ? double(*s.lr_dev) : s.lr;
  const double inv_scale = s.grad_scale ? 1.0 / double(*s.grad_scale) : s.inv_scale_host;
  const double step = meta.step_dev[t] ? double(*meta.step_dev[t]) : meta.step_host[t];
  const auto coeffs = (s.weight_decay_dev ? with_weight_decay(family, double(*s.weight_decay_dev)) : family)
                          .template coeffs<S>(lr, step, inv_scale);

  void* ptr[kSlots];
  bool aligned = true;
  for (int k = 0; k < kSlots; ++k) {
    void* base = k == kMaster && !Master ? nullptr : meta.addr[k][t];
    ptr[k] = base == nullptr ? nullptr
             : slot_is_float<scalar_t, Master>(k) ? static_cast<void*>(static_cast<float*>(base) + begin)
                                                  : static_cast<void*>(static_cast<scalar_t*>(base) + begin);
    aligned = aligned && (reinterpret_cast<uintptr_t>(ptr[k]) % kVectorBytes == 0);
  }
  const auto loaded = [&](int k) { return ptr[k] != nullptr && !(Master && k == 0); };
  const auto stored = [&](int k) { return ptr[k] != nullptr && k != 1; };
  const auto update = [&](S* x) {  // x[kSlots]: one element of every slot
    if (Master) x[0] = x[kMaster];
    family.update(x, coeffs);
    if (Master) x[kMaster] = x[0];
  };
  const int64_t vector_end = aligned ? len - len % W : 0;  // kChunk is a multiple of W
  for (int64_t i = int64_t(thread) * W; i < vector_end; i += int64_t(nthreads) * W) {
    S x[kSlots][W] = {};
    for (int k = 0; k < kSlots; ++k) {
      if (!loaded(k)) continue;
      if (slot_is_float<scalar_t, Master>(k)) load_pack<float, W>(ptr[k], i, x[k]);
      else load_pack<scalar_t, W>(ptr[k], i, x[k]);
    }
    for (int j = 0; j < W; ++j) {
      S e[kSlots];
      for (int k = 0; k < kSlots; ++k) e[k] = x[k][j];
      update(e);
      for (int k = 0; k < kSlots; ++k) x[k][j] = e[k];
    }
    for (int k = 0; k < kSlots; ++k) {
      if (!stored(k)) continue;
      if (slot_is_float<scalar_t, Master>(k)) store_pack<float, W>(ptr[k], i, x[k]);
      else store_pack<scalar_t, W>(ptr[k], i, x[k]);
    }
  }
  for (int64_t i = vector_end + thread; i < len; i += nthreads) {
    S e[kSlots] = {};
    for (int k = 0; k < kSlots; ++k) {
      if (!loaded(k)) continue;
      e[k] = slot_is_float<scalar_t, Master>(k) ? S(static_cast<const float*>(ptr[k])[i])
                                                : S(static_cast<const scalar_t*>(ptr[k])[i]);
    }
    update(e);
    for (int k = 0; k < kSlots; ++k) {
      if (!stored(k)) continue;
      if (slot_is_float<scalar_t, Master>(k)) static_cast<float*>(ptr[k])[i] = float(e[k]);
      else static_cast<scalar_t*>(ptr[k])[i] = scalar_t(e[k]);
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
static_assert(sizeof(AdamFamily) <= 128 && sizeof(RMSpropFamily) <= 128 && sizeof(SGDFamily) <= 128,
              "a family's options must stay within the 128 bytes the argument budget above allows them");

// Host side: packs tensors and their chunks into Meta and calls launch(meta, nblocks) each time a
// launch is full (`limits`), and once at the end. `addr(t, k)`, `numel(t)`, `step_host(t)`,
// `step_dev(t)` describe tensor t of n.
template <typename Describe, typename Launch>
void for_each_launch(int n, const Describe& d, Limits limits, const Launch& launch) {
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
      const bool tensors_full = tensors + 1 == limits.tensors && c + 1 == chunks;
      if (blocks == limits.blocks || tensors_full) {
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
