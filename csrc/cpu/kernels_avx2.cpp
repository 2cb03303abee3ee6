// The CPU kernels for AVX2+FMA CPUs, chosen at run time by host.cpp. The target pragma (rather
// than -mavx2 for the whole extension) keeps the rest of the binary runnable on any x86-64 CPU.
// GCC's pragma does not define the feature macros that at::vec and sleef.h test, so they are
// defined here, for this file only.
#include "baseline_headers.h"
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx,avx2,fma,f16c")
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY_AVX2
#endif
#define CPU_CAPABILITY AVX2
#include "kernels.h"
