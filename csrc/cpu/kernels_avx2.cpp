// The CPU kernels for AVX2+FMA CPUs, chosen at run time by host.cpp. The target pragma (rather
// than -mavx2 for the whole extension) keeps the rest of the binary runnable on any x86-64 CPU.
#include "baseline_headers.h"
#ifdef FUSED_OPT_X86_VARIANTS
#pragma GCC target("avx,avx2,fma,f16c")
#include "avx2_macros.h"
#define CPU_CAPABILITY_AVX2
#endif
#define CPU_CAPABILITY AVX2
#include "kernels.h"
