// OpenBLAS picks its kernels once, when the library loads. Its CPU detection (0.3.21)
// does not know recent Xeons and falls back to the Prescott (SSE3) kernels, which
// decode ~1.6x slower here. EnsureBlasCoreType() re-executes the program with
// OPENBLAS_CORETYPE set to the best kernel family the CPU supports, unless the
// variable is already set or detection worked.
#pragma once

namespace superpose::engine::cpu {

// Call first thing in main(). Returns only when no re-exec was needed (or possible).
void EnsureBlasCoreType(char** argv);
// The kernel family OpenBLAS uses (e.g. "SkylakeX").
const char* BlasCoreName();

}  // namespace superpose::engine::cpu
