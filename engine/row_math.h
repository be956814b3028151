// Passes over a whole row of logits for the sampler, vectorised with Google Highway for
// the SIMD target in use (engine/simd.h: AVX-512, AVX2, SSE4, NEON or the portable
// fallback): the maximum, exp (Highway's, max error 1 ulp; log-sum-exp), and the passes
// of the exponential race (engine/row_sampling.h) with SpExp and SpLog in vector form:
// bitwise the scalar functions' values on every target, so that the host draws the
// reference's token. Scalar code here was most of the time of sampling a 128k-token
// vocabulary.
#pragma once

#include <cstdint>
#include <vector>

namespace superpose::engine {

// out[i] = exp(x[i] * scale - shift) for i < n (not stored when out is null); returns
// their sum (in double). The result of each element depends only on x[i], scale and
// shift (never on its position or on n), so a token's weight is the same whether
// computed over the whole row or over a few candidates.
double ScaledExp(const float* x, int32_t n, float scale, float shift, float* out);

// The largest of x[0..n), n >= 1 (exact: max does not round).
float MaxOf(const float* x, int32_t n);

// The lowest i < n with x[i] == v, n if none.
int32_t FirstIndexOf(const float* x, int32_t n, float v);

// out[i] = SpExp(x[i]) (SpLog) for i < n: the vector forms the race passes use.
void SpExpRow(const float* x, int64_t n, float* out);
void SpLogRow(const float* x, int64_t n, float* out);

// The Highway target these passes dispatch to now (tests: that a restriction applies).
const char* RowMathTarget();

// Which tokens of a row take part in the race, z = ScaledLogit(x, inv_t, mx).
struct RaceFilter {
  float min_p = 0.0f;  // SpExp(z) >= min_p (tested when min_p > 0)
  // top-p: RankKey(x) > cut_key, or RankKey(x) == cut_key and id <= cut_last
  uint32_t cut_key = 0;
  int32_t cut_last = INT32_MAX;
  float z_floor = -__builtin_inff();  // z >= z_floor (the caller knows the rest cannot win)
};

// The race over x[0..V): the id of the largest z_i + RaceNoiseAt(key, i) over the tokens
// `filter` keeps, lower id on ties; -1 when no kept token scores above -infinity.
int32_t RaceRow(const float* x, int32_t V, float inv_t, float mx, uint64_t key,
                const RaceFilter& filter);

// The tokens of x[0..V) of weight w = SpExp(z) >= min_p with FixedMass(w) > 0, in id
// order: the first `count` entries of ids, their RankKey and FixedMass (as floats: exact
// integers up to 2^32). The vectors only grow (no refill per row).
struct KeptMasses {
  int32_t count = 0;
  std::vector<int32_t> ids;
  std::vector<uint32_t> keys;
  std::vector<float> mass;
  uint64_t total = 0;  // the sum of the masses
};
void WeighRow(const float* x, int32_t V, float inv_t, float mx, float min_p, KeptMasses* out);

}  // namespace superpose::engine
