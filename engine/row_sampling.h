// Sampling a logits row where the row is (on the GPU, without copying the vocabulary to
// the host): for requests with a temperature and no top-k or penalties, whose whole
// row the host sampler would need. One definition, shared by the CUDA kernel
// (cuda/sample_body.h, through the SP_RS_FN functions below) and the host reference
// (SampleRowReference), which backends without a device use and tests check against.
//
// The draw is an exponential race (the Gumbel-max trick): token = argmax over the kept
// tokens of (x_i / T - max / T) + G_i, G_i = -log(-log(U_i)), U_i a uniform in (0, 1)
// hashed from (seed, draw, i) (RaceKey once per row, then one splitmix64 step per
// token) - an exact sample from softmax(x / T) restricted to the kept tokens, computed
// in one pass, in any order, with no sort and no normalisation.
// `draw` is the index of the generated token, so a recomputed (preempted) request draws
// the same tokens. Kept: the tokens with weight w_i = exp(x_i / T - max / T) >= min_p
// (the best has weight 1), then with top_p < 1 the shortest prefix in rank order (logit
// descending, lower id first on ties) whose mass reaches top_p, mass counted in fixed
// point (floor(w_i * 2^32), exact integer sums, so that the cut depends on no summation
// order).
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define SP_RS_FN __host__ __device__ __forceinline__
#else
#define SP_RS_FN inline
#endif

namespace superpose::engine {

// How a backend samples one logits row (BatchPlan::sampling); temperature 0: it does not.
struct RowSampling {
  float temperature = 0.0f;
  float top_p = 1.0f;
  float min_p = 0.0f;
  uint64_t seed = 0;
  int64_t draw = 0;
};

SP_RS_FN uint64_t Mix64(uint64_t z) {  // splitmix64's finaliser
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The race's key for one draw: (seed, draw) hashed once per row.
SP_RS_FN uint64_t RaceKey(uint64_t seed, int64_t draw) {
  return Mix64(seed ^ Mix64(static_cast<uint64_t>(draw) * 0x9E3779B97F4A7C15ull +
                            0x632BE59BD9B4E019ull));
}

// The 24 random bits of token i under `key` (splitmix64's output for index i + 1).
SP_RS_FN uint32_t RaceBits(uint64_t key, int32_t i) {
  return static_cast<uint32_t>(
      Mix64(key + (static_cast<uint64_t>(i) + 1) * 0x9E3779B97F4A7C15ull) >> 40);
}

// The race noise of token i: -log(-log(U)), U = (bits + 1/2) / 2^24 in (0, 1).
SP_RS_FN float RaceNoiseAt(uint64_t key, int32_t i) {
  const float u = (static_cast<float>(RaceBits(key, i)) + 0.5f) * (1.0f / 16777216.0f);
  return -logf(-logf(u));
}

SP_RS_FN float RaceNoise(uint64_t seed, int64_t draw, int32_t i) {
  return RaceNoiseAt(RaceKey(seed, draw), i);
}

// Larger logit, larger key; -0 and +0 are one key.
SP_RS_FN uint32_t RankKey(float f) {
  f += 0.0f;
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u);
}

// x / T - max / T, written once so that every caller rounds it the same way (no fused
// multiply-add on the device).
SP_RS_FN float ScaledLogit(float x, float inv_t, float mx) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(__fmul_rn(x, inv_t), mx);
#else
  const volatile float p = x * inv_t;
  return p - mx;
#endif
}

// A weight in [0, 1] in fixed point (2^32 = 1).
SP_RS_FN uint64_t FixedMass(float w) { return static_cast<uint64_t>(w * 4294967296.0f); }

// The fixed-point mass the kept prefix must reach: ceil(top_p * total), at least 1.
SP_RS_FN uint64_t TopPTarget(float top_p, uint64_t total) {
  const double t = ceil(static_cast<double>(top_p) * static_cast<double>(total));
  return t < 1.0 ? 1 : static_cast<uint64_t>(t);
}

// The host reference: the token the kernel draws for row x[0..V) (up to the last bits
// of exp and log on the device). The host sampler (engine/runtime/sampler.h) draws the
// same token, bitwise, for every temperature request; with top-k it is this draw over
// the row with every token outside the top k at -infinity.
int32_t SampleRowReference(const float* x, int32_t V, const RowSampling& s);

}  // namespace superpose::engine
