#include "engine/cpu/blas_setup.h"

#include <cblas.h>
#include <unistd.h>

#include <strings.h>
#include <cstdlib>
#include <cstring>

namespace superpose::engine::cpu {

const char* BlasCoreName() { return openblas_get_corename(); }

void EnsureBlasCoreType(char** argv) {
  if (std::getenv("OPENBLAS_CORETYPE") != nullptr) return;
  if (strcasecmp(openblas_get_corename(), "prescott") != 0) return;  // detection worked
  const char* core = nullptr;
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) {
    core = "SkylakeX";
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    core = "Haswell";
  }
  if (core == nullptr) return;
  setenv("OPENBLAS_CORETYPE", core, 1);
  execv("/proc/self/exe", argv);
  // execv failed: carry on with the detected kernels.
}

}  // namespace superpose::engine::cpu
