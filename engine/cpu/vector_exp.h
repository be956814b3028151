// glibc's libmvec: 16 expf at once (max error 4 ulp), the vector variant GCC itself calls
// under -ffast-math. Linked through `mvec` (CMakeLists.txt); call it only from AVX-512
// code (CpuHasAvx512()).
#pragma once

#include <immintrin.h>

extern "C" __m512 _ZGVeN16v_expf(__m512 x);
