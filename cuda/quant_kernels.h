// Launchers of the dequantizing GEMM kernels (cuda/quant_kernels.cu) of the CUDA
// backend's quantized projections (--cuda_dtype=int8|q4; formats in
// engine/model/quantize.h, per-element math and the warp body in cuda/quant_body.h).
// y[T, out] = x[T, in] * W'^T, bf16 activations, float32 accumulation:
//  - decode (T <= kQuantStreamMaxT): LaunchQuantGemv streams the codes once for every
//    token (one warp per output row, the tokens' sums in registers);
//  - prefill: LaunchQuantDequantBf16 expands rows of W' to bf16 in a scratch buffer and
//    the caller runs cuBLAS on it (cuda/cuda_quant.cc).
// Every pointer is a device pointer; launch parameters depend on the shapes only, so
// that the launches can be captured in the decode CUDA graphs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/quant_body.h"

namespace superpose::cuda {

// y[t, r] for t < T, r < w.out (tiles of up to kQuantStreamMaxT tokens; any T works).
cudaError_t LaunchQuantGemv(const QuantView& w, const __nv_bfloat16* x, int32_t T, float* y,
                            cudaStream_t stream);

// out[(r - r0) * w.in + c] = bf16(W'[r, c]) for rows [r0, r1).
cudaError_t LaunchQuantDequantBf16(const QuantView& w, int32_t r0, int32_t r1, __nv_bfloat16* out,
                                   cudaStream_t stream);

// n code bytes from a counter-based hash of (seed, index) (random weights of benchmarks;
// never the int8 code -128).
cudaError_t LaunchQuantFillRandom(uint8_t* codes, int64_t n, uint64_t seed, cudaStream_t stream);

// Loads this file's kernels on the current device now (as LoadKernels, cuda/kernels.h:
// not in the middle of a step under lazy module loading).
cudaError_t LoadQuantKernels();

}  // namespace superpose::cuda
