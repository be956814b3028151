// Launcher of the segmented LoRA kernels (cuda/lora_kernels.cu; bodies in
// cuda/lora_body.h). Every pointer is a device pointer; it enqueues on `stream` and
// returns the launch error without synchronizing.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace superpose::cuda {

// For the `num_segs` segments at `segs` (kLoraSegmentWords each): the shrink of the
// site's `slots` modules of `layer` from x [T, x_width] into u [T, kLoraUWidth], then
// their expand into y [T, y_width]. max_out bounds every module's output width.
cudaError_t LaunchLoraSite(const int32_t* segs, int32_t num_segs, int32_t layer, int32_t site,
                           int32_t slots, const __nv_bfloat16* x, int32_t x_width, float* u,
                           float* y, int32_t y_width, int32_t max_out, cudaStream_t stream);

// Loads the LoRA kernels on the current device now (with CUDA's lazy module loading
// the first launch would otherwise load them, in the middle of a step).
cudaError_t LoadLoraKernels();

}  // namespace superpose::cuda
