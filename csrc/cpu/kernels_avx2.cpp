// The CPU kernels compiled for AVX2 + FMA (256-bit at::vec code), whatever flags the
// rest of the extension is built with. See kernels_prelude.h for why the prelude comes
// before the pragma.
#include "cpu/kernels_prelude.h"

#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define RPO_KERNELS_FN kernels_avx2
#define RPO_KERNELS_NAME "avx2"
// at::vec's lambdas warn that vector returns change the ABI; these functions never cross
// a boundary compiled for another instruction set.
#pragma GCC diagnostic ignored "-Wpsabi"
#include "cpu/kernels_impl.h"
