// The CPU kernels for AVX2+FMA CPUs, chosen at run time by ops_cpu.cpp. The target pragma (rather
// than -mavx2 for the whole extension) keeps the rest of the binary runnable on any x86-64 CPU.
// GCC's pragma does not define the feature macros that sleef.h (included by at::vec) tests, so
// they are defined here, for this file only.
//
// Every header but at::vec's comes first, compiled for the baseline target: GCC 13's libstdc++
// marks allocator members always_inline, and a std::string defined after the pragma then fails to
// compile ("inlining failed ... target specific option mismatch") as its implicit destructor is
// baseline code calling an AVX2 one. Baseline code inlines into AVX2 code; the reverse is refused.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <array>
#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>
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
