// The CPU kernels for the baseline instruction set (at::vec's scalar fallback, which the
// compiler vectorizes with SSE2). Picked where neither AVX2 nor AVX-512 is usable.
#include "cpu/kernels_prelude.h"

#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#define RPO_KERNELS_FN kernels_default
#define RPO_KERNELS_NAME "default"
#include "cpu/kernels_impl.h"
