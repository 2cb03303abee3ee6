// Every header the SIMD kernels need except at::vec's, for kernels_avx2.cpp and kernels_avx512.cpp
// to include *before* their target pragma, so that this code is compiled for the baseline target:
// GCC 13's libstdc++ marks allocator members always_inline, and a std::string defined after the
// pragma then fails to compile ("inlining failed ... target specific option mismatch") as its
// implicit destructor is baseline code calling a wider one. Baseline code inlines into AVX code;
// the reverse is refused.
#pragma once

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

#include "launch.h"
