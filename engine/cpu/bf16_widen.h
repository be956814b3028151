// The bf16-weight GEMM kernel for CPUs without AMX or AVX512-BF16 (AVX2 and SSE4 x86,
// Arm NEON, and the portable fallback): each weight pair of the packed layout is widened
// to two float32 vectors in registers (a shift and a mask) and multiplied with fused
// multiply-adds. Weights stream at half the bytes of float32, which is what batch-1
// decode is bound by. Written once with Highway; the target is picked at run time.
#pragma once

#include <cstdint>

#include "engine/cpu/bf16_gemm.h"

namespace superpose::engine::cpu {

// y[m, 32 * rb ...] (the up to 32 output columns of row block rb) for m < rows, from
// activations xp (float32 values already rounded to bf16, rows `ld` = w.k_blocks() * 32
// floats apart, zero past w.in()). Per output element: for each 32-input block, for each
// input pair, acc = fma(x_even, w_even, acc) then acc = fma(x_odd, w_odd, acc), from 0:
// the same sequence whatever `rows` is, so a row's result never depends on its batch.
void Bf16WidenRowBlock(const PackedBf16& w, int32_t rb, const float* xp, int32_t ld, int32_t rows,
                       float* y);

}  // namespace superpose::engine::cpu
