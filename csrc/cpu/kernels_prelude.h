// Headers of the CPU kernels that must be compiled for the baseline instruction set.
//
// kernels_avx2.cpp and kernels_avx512.cpp switch the instruction set with
// `#pragma GCC target(...)`, which applies to every function defined after it. Inline
// functions outside at::vec's `CPU_CAPABILITY` namespace (c10's BFloat16 and Half
// conversions, ATen's parallel_for, ...) are shared by all translation units of the
// extension, and the linker keeps one copy of each: if that copy were compiled for AVX-512
// it could run on a CPU without it. So every such header is included here, before the
// pragma; the include guards keep the vector headers from including them again under it.
// (The list is everything ATen/cpu/vec/vec.h includes from outside ATen/cpu/vec;
// docs/kernels-cpp.md tells how the built object is checked.)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include <cstdio>

#include <ATen/AccumulateType.h>
#include <ATen/Config.h>
#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float4_e2m1fn_x2.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e4m3fnuz.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Float8_e5m2fnuz.h>
#include <c10/util/Float8_e8m0fnu.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/TypeCast.h>
#include <c10/util/complex.h>
#include <c10/util/irange.h>
#include <c10/util/qint32.h>
#include <c10/util/qint8.h>
#include <c10/util/quint2x4.h>
#include <c10/util/quint4x2.h>
#include <c10/util/quint8.h>

#include "cpu/kernels.h"

namespace rpo_fast {
namespace cpu {

}  // namespace cpu
}  // namespace rpo_fast

// sleef.h (vectorized math that at::vec's AVX2/AVX-512 classes call) declares its 256- and
// 512-bit functions only when __AVX2__ / __AVX512F__ are defined, which the target pragma
// does not do. Declarations need no special instructions, so define the macros for this
// one include; nothing here calls those functions.
#if defined(__x86_64__)
#include <x86intrin.h>  // first, with the true macros: its intrinsics depend on them
#endif
#if defined(__x86_64__) && !defined(__AVX2__)
#define RPO_FAST_FAKE_AVX_MACROS
#define __AVX__ 1
#define __AVX2__ 1
#define __AVX512F__ 1
#endif
#include <sleef.h>
#ifdef RPO_FAST_FAKE_AVX_MACROS
#undef __AVX__
#undef __AVX2__
#undef __AVX512F__
#undef RPO_FAST_FAKE_AVX_MACROS
#endif
