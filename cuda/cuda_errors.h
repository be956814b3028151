// Sticky CUDA errors: after an illegal address, a kernel assertion, a launch failure or
// an uncorrectable ECC error the CUDA context is unusable (every later call fails with
// the same error) and only a new process can use the GPU again. The CUDA backend records
// the first one and reports it through Backend::Health, so that the server turns
// NOT_SERVING instead of failing every step.
#pragma once

#include <cuda_runtime.h>

#include "absl/status/status.h"

namespace superpose::cuda {

// Whether `e` leaves the context unusable (the process must restart).
bool IsStickyCudaError(cudaError_t e);
// The cudaError_t of a status made by CudaStatus (cuda/cuda_util.h); cudaSuccess for
// any other status.
cudaError_t CudaErrorOf(const absl::Status& st);

}  // namespace superpose::cuda
