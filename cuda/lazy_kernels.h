// Launchers of LazyLLM's kernels (cuda/lazy_kernels.cu; score-row bodies in
// cuda/lazy_body.h). Every pointer is a device pointer; each enqueues on `stream` and
// returns the launch error without synchronizing.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/lazy_body.h"

namespace superpose::cuda {

// For each of the `n` items (LazyScoreItem, device memory): the softmax rows of its
// query row over its keys for each of the qh local query heads into head_rows, then
// their sum over the heads into out (cuda/lazy_body.h).
cudaError_t LaunchLazyScores(const LazyScoreItem* items, int32_t n, const float* q,
                             const __nv_bfloat16* k_layer, const int32_t* keys, int32_t qh,
                             int32_t kvh, int32_t D, float scale, float* head_rows, float* out,
                             cudaStream_t stream);

// Loads these kernels on the current device now (not in the middle of a step under
// CUDA's lazy module loading).
cudaError_t LoadLazyKernels();

}  // namespace superpose::cuda
