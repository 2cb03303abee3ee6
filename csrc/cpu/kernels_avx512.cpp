// The CPU kernels for AVX-512 CPUs (F, BW, VL, DQ: what torch's own AVX512 kernels require),
// chosen at run time by host.cpp: 16 floats a vector, and bf16/fp16 converted 32 at a time. Same
// scheme as kernels_avx2.cpp: a target pragma for this file only, and the feature macros that
// at::vec and sleef.h test defined by hand, as GCC's pragma does not define them.
#include "baseline_headers.h"
#ifdef FUSED_OPT_X86_VARIANTS
#pragma GCC target("avx,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
#include "avx2_macros.h"
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY_AVX512
#endif
#define CPU_CAPABILITY AVX512
#include "kernels.h"
