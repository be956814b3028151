// Passes over a whole row of logits for the sampler, vectorised (AVX-512 or AVX2 as the
// CPU allows, scalar otherwise): the maximum, and exp through glibc's vector expf
// (libmvec, max error 4 ulp) instead of one scalar call per element. Scalar code here
// was most of the time of sampling a 128k-token vocabulary.
#pragma once

#include <cstdint>

namespace superpose::engine {

// out[i] = exp(x[i] * scale - shift) for i < n (not stored when out is null); returns
// their sum (in double). The result of each element depends only on x[i], scale and
// shift (never on its position or on n), so a token's weight is the same whether
// computed over the whole row or over a few candidates.
double ScaledExp(const float* x, int32_t n, float scale, float shift, float* out);

// The largest of x[0..n), n >= 1 (exact: max does not round).
float MaxOf(const float* x, int32_t n);

}  // namespace superpose::engine
