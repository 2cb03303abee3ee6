// The feature macros of AVX2, FMA and F16C, which at::vec and sleef.h test to pick their code.
// GCC's `#pragma GCC target` enables the instructions but does not define these, so the kernel
// files define them by hand, after their pragma (kernels_avx2.cpp, kernels_avx512.cpp).
#pragma once

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
