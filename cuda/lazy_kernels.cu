// LazyLLM's kernels: the boundary score rows (bodies in cuda/lazy_body.h) and the
// gather of the rows that go on to the next stage.
#include <cuda_bf16.h>

#include <initializer_list>

#include "cuda/lazy_body.h"
#include "cuda/lazy_kernels.h"

namespace superpose::cuda {
namespace {

using bf16 = __nv_bfloat16;

struct LazyCtx {
  __device__ int tid() const { return threadIdx.x; }
  __device__ int nthreads() const { return blockDim.x; }
  __device__ void sync() const { __syncthreads(); }
  __device__ float load(const bf16* p, int64_t i) const { return __bfloat162float(p[i]); }
};

// grid (items, qh).
__global__ void __launch_bounds__(kLazyThreads)
    LazyHeadRowKernel(const LazyScoreItem* __restrict__ items, const float* __restrict__ q,
                      const bf16* __restrict__ kc, const int32_t* __restrict__ keys, int32_t qh,
                      int32_t kvh, int32_t D, float scale, float* __restrict__ head_rows) {
  __shared__ float red[kLazyThreads];
  LazyCtx c;
  LazyHeadRowBlock(c, items[blockIdx.x], static_cast<int32_t>(blockIdx.y), q, kc, keys, qh, kvh, D,
                   scale, red, head_rows);
}

// grid (items).
__global__ void __launch_bounds__(kLazyThreads)
    LazyHeadSumKernel(const LazyScoreItem* __restrict__ items, int32_t qh,
                      const float* __restrict__ head_rows, float* __restrict__ out) {
  LazyCtx c;
  LazyHeadSumBlock(c, items[blockIdx.x], qh, head_rows, out);
}

}  // namespace

cudaError_t LaunchLazyScores(const LazyScoreItem* items, int32_t n, const float* q,
                             const bf16* k_layer, const int32_t* keys, int32_t qh, int32_t kvh,
                             int32_t D, float scale, float* head_rows, float* out,
                             cudaStream_t stream) {
  if (n <= 0 || qh <= 0) return cudaSuccess;
  if (kvh <= 0 || qh % kvh != 0) return cudaErrorInvalidValue;
  const dim3 rows(static_cast<unsigned>(n), static_cast<unsigned>(qh));
  LazyHeadRowKernel<<<rows, kLazyThreads, 0, stream>>>(items, q, k_layer, keys, qh, kvh, D, scale,
                                                       head_rows);
  if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  LazyHeadSumKernel<<<static_cast<unsigned>(n), kLazyThreads, 0, stream>>>(items, qh, head_rows,
                                                                           out);
  return cudaGetLastError();
}

cudaError_t LoadLazyKernels() {
  for (const void* k : {reinterpret_cast<const void*>(LazyHeadRowKernel),
                        reinterpret_cast<const void*>(LazyHeadSumKernel)}) {
    cudaFuncAttributes attr;
    if (const cudaError_t e = cudaFuncGetAttributes(&attr, k); e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace superpose::cuda
