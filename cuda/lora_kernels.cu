// The segmented LoRA kernels (SGMV): shrink and expand, one launch each per adapted
// site covering every segment of the step. Bodies in cuda/lora_body.h.
#include <cuda_bf16.h>

#include <initializer_list>

#include "cuda/lora_body.h"
#include "cuda/lora_kernels.h"

namespace superpose::cuda {
namespace {

using bf16 = __nv_bfloat16;

struct LoraCtx {
  __device__ int tid() const { return threadIdx.x; }
  __device__ int nthreads() const { return blockDim.x; }
  __device__ void sync() const { __syncthreads(); }
  __device__ float load(const bf16* p, size_t i) const { return __bfloat162float(p[i]); }
};

// grid (segments, slots).
__global__ void __launch_bounds__(kLoraThreads)
    LoraShrinkKernel(const int32_t* __restrict__ segs, int32_t layer, int32_t site,
                     const bf16* __restrict__ x, int32_t x_width, float* __restrict__ u) {
  __shared__ float smem[kLoraThreads];
  LoraCtx c;
  LoraShrinkBlock<bf16>(c, segs + static_cast<size_t>(blockIdx.x) * kLoraSegmentWords, layer, site,
                        static_cast<int32_t>(blockIdx.y), x, x_width, smem, u);
}

// grid (segments, slots, column tiles).
__global__ void __launch_bounds__(kLoraThreads)
    LoraExpandKernel(const int32_t* __restrict__ segs, int32_t layer, int32_t site,
                     const float* __restrict__ u, float* __restrict__ y, int32_t y_width) {
  LoraCtx c;
  LoraExpandBlock<bf16>(c, segs + static_cast<size_t>(blockIdx.x) * kLoraSegmentWords, layer, site,
                        static_cast<int32_t>(blockIdx.y), static_cast<int32_t>(blockIdx.z), u, y,
                        y_width);
}

}  // namespace

cudaError_t LaunchLoraSite(const int32_t* segs, int32_t num_segs, int32_t layer, int32_t site,
                           int32_t slots, const bf16* x, int32_t x_width, float* u, float* y,
                           int32_t y_width, int32_t max_out, cudaStream_t stream) {
  if (num_segs <= 0 || slots <= 0 || max_out <= 0) return cudaSuccess;
  const dim3 shrink(static_cast<unsigned>(num_segs), static_cast<unsigned>(slots));
  LoraShrinkKernel<<<shrink, kLoraThreads, 0, stream>>>(segs, layer, site, x, x_width, u);
  if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  const dim3 expand(static_cast<unsigned>(num_segs), static_cast<unsigned>(slots),
                    static_cast<unsigned>((max_out + kLoraThreads - 1) / kLoraThreads));
  LoraExpandKernel<<<expand, kLoraThreads, 0, stream>>>(segs, layer, site, u, y, y_width);
  return cudaGetLastError();
}

cudaError_t LoadLoraKernels() {
  for (const void* k : {reinterpret_cast<const void*>(LoraShrinkKernel),
                        reinterpret_cast<const void*>(LoraExpandKernel)}) {
    cudaFuncAttributes attr;
    if (const cudaError_t e = cudaFuncGetAttributes(&attr, k); e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace superpose::cuda
