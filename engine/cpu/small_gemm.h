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
// OpenMP thread count), so a sequence's results do not depend on its batch: 16 lane-wise
// partial sums over `in` (lane l takes k = l mod 16; the tail zero-filled), fused
// multiply-adds where the SIMD target has them, then a fixed reduction tree. The sum
// order is the same on every Highway target, so the targets with FMA (AVX-512, AVX2,
// NEON) agree bitwise; SSE4 and the portable EMU128 round each product separately.
void SmallBatchGemm(const float* x, int32_t rows, int32_t in, const float* w, int32_t out,
                    float* y);

// One thread's panel of SmallBatchGemm, for kernels that make float weight rows on the fly
// (engine/cpu/quant_gemm.cc): y[r * ldy + c] = x[r * ldx ...] . w[c * ldw ...] over `in`
// for r < rows, c < cols, each element computed exactly as SmallBatchGemm computes it.
void SmallGemmPanel(const float* x, int32_t rows, int32_t ldx, const float* w, int32_t cols,
                    int32_t ldw, int32_t in, float* y, int32_t ldy);

// The Highway target SmallBatchGemm dispatches to now ("AVX3", "AVX2", "SSE4", "NEON",
// "EMU128"; see engine/simd.h).
const char* SmallGemmKernelName();

}  // namespace superpose::engine::cpu
