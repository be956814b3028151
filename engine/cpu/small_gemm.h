// The CPU backend's float32 GEMM: y = x * W^T, for every step size. Up to 64 rows
// (decode) it streams W from memory once per call; above, it runs cache blocks (a
// chunk of weight rows against blocks of activation rows). Unlike sgemm, each output
// element is computed the same way whatever the number of rows, the row's place among
// them and the thread count, so a sequence's results never depend on its batch.
#pragma once

#include <cstdint>

namespace superpose::engine::cpu {

// y[rows, out] = x[rows, in] * W[out, in]^T. Each output element is computed the same
// way whatever `rows` is (and whatever other rows are in the call, and whatever the
// OpenMP thread count), so a sequence's results do not depend on its batch. On CPUs
// with AVX-512 the dot products use 16 lane-wise fused multiply-add partial sums over
// `in` and a fixed reduction tree; elsewhere a portable kernel is used (the same
// invariance, different rounding).
void SmallBatchGemm(const float* x, int32_t rows, int32_t in, const float* w, int32_t out,
                    float* y);

// The portable kernel, whatever the CPU (for tests and comparisons).
void SmallBatchGemmPortable(const float* x, int32_t rows, int32_t in, const float* w, int32_t out,
                            float* y);

// True when the CPU has AVX-512 F, DQ, VL and BW (the vector kernels of the CPU backend).
bool CpuHasAvx512();

// "avx512" or "portable": the kernel SmallBatchGemm uses on this CPU.
const char* SmallGemmKernelName();

}  // namespace superpose::engine::cpu
