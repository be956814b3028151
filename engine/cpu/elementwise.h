// The CPU backend's element-wise ops on one row, written once with Google Highway and
// dispatched to the best SIMD target of the CPU (engine/simd.h). A row's result depends
// only on the row (and its length), never on where it sits in a batch: the same lanes
// and the same order of operations whatever the call. Results are fixed per target and
// differ between targets by rounding only.
#pragma once

#include <cstdint>

namespace superpose::engine::cpu {

// y = x / sqrt(mean(x^2) + eps) * w over n values; y may be x.
void RmsNorm(const float* x, const float* w, int32_t n, float eps, float* y);

// rotate_half RoPE in place on one head vector of `dim` floats: with half = dim / 2,
// (x[i], x[i + half]) turns by the angle whose cosine and sine are cos[i], sin[i].
void Rope(float* x, const float* cos, const float* sin, int32_t dim);

// SwiGLU: a = silu(g) * u = g / (1 + exp(-g)) * u over n values.
void SwiGlu(const float* g, const float* u, int32_t n, float* a);

}  // namespace superpose::engine::cpu
