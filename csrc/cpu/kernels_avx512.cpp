// The CPU kernels compiled for AVX-512 F/BW/DQ/VL (512-bit at::vec code), whatever flags
// the rest of the extension is built with. See kernels_prelude.h for why the prelude comes
// before the pragma.
#include "cpu/kernels_prelude.h"

#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define RPO_KERNELS_FN kernels_avx512
#define RPO_KERNELS_NAME "avx512"
// at::vec's lambdas warn that vector returns change the ABI; these functions never cross
// a boundary compiled for another instruction set.
#pragma GCC diagnostic ignored "-Wpsabi"
#include "cpu/kernels_impl.h"
