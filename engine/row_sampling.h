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
// the same tokens. exp and log are SpExp and SpLog below (IEEE operations only: the
// same bits everywhere). Kept: the tokens with weight w_i = exp(x_i / T - max / T) >= min_p
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
  return Mix64(seed ^
               Mix64(static_cast<uint64_t>(draw) * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull));
}

// The 24 random bits of token i under `key` (splitmix64's output for index i + 1).
SP_RS_FN uint32_t RaceBits(uint64_t key, int32_t i) {
  return static_cast<uint32_t>(
      Mix64(key + (static_cast<uint64_t>(i) + 1) * 0x9E3779B97F4A7C15ull) >> 40);
}

// ---- exp and log, one definition: the same bits on the host (scalar or vector) and on
// the device. Only IEEE-exact operations (each rounded once, to nearest): explicit
// fused multiply-adds (RsFma), plain multiplies and adds that no compiler fuses (RsMul,
// RsAdd: the device's are __fmul_rn / __fadd_rn, which nvcc never contracts; on the
// host they feed no add here), compares and integer operations on the bits. A vector
// version (engine/row_math.cc) performs the same operations lane by lane.

SP_RS_FN float RsFma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return fmaf(a, b, c);
#endif
}

SP_RS_FN float RsMul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

SP_RS_FN float RsAdd(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

SP_RS_FN uint32_t RsBits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

SP_RS_FN float RsFloat(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// The constants SpExp and SpLog share with their vector versions.
namespace sp_math {
constexpr uint32_t kNaN = 0x7FC00000u;       // the quiet NaN both return
constexpr uint32_t kInf = 0x7F800000u;       // +infinity
constexpr uint32_t kMinusInf = 0xFF800000u;  // -infinity
// exp: round(z / ln 2) through 1.5 * 2^23 (an fma rounds z * log2(e) + 1.5 * 2^23 to an
// integer), ln 2 in two parts (kLn2Hi has 9 bits: n * kLn2Hi is exact), and exp(r) on
// |r| <= ln(2) / 2 as 1 + r + r^2 * P(r) (Cephes' expf coefficients), all by Horner.
constexpr float kExpLo = -104.0f;  // exp(-104) < 2^-150: 0 at and below
constexpr float kExpHi = 89.0f;    // exp(89) > FLT_MAX: +inf at and above
constexpr float kLog2E = 1.44269502f;
constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
constexpr uint32_t kRoundBits = 0x4B400000u;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kExpP0 = 1.9875691500e-4f;
constexpr float kExpP1 = 1.3981999507e-3f;
constexpr float kExpP2 = 8.3334519073e-3f;
constexpr float kExpP3 = 4.1665795894e-2f;
constexpr float kExpP4 = 1.6666665459e-1f;
constexpr float kExpP5 = 5.0000001201e-1f;
// log: x = 2^e * m with m in [sqrt(1/2), sqrt(2)) (taken from the bits: e = the
// exponent of x / sqrt(1/2)), f = m - 1 (exact), log(1 + f) = f - f^2 / 2 + f^3 * Q(f)
// (Cephes' logf coefficients), plus e * ln 2 in the two parts above.
constexpr uint32_t kSqrtHalfBits = 0x3F3504F3u;
constexpr uint32_t kMinNormalBits = 0x00800000u;
constexpr float kTwo23 = 8388608.0f;  // denormals are scaled by 2^23 first
constexpr float kLogQ0 = 7.0376836292e-2f;
constexpr float kLogQ1 = -1.1514610310e-1f;
constexpr float kLogQ2 = 1.1676998740e-1f;
constexpr float kLogQ3 = -1.2420140846e-1f;
constexpr float kLogQ4 = 1.4249322787e-1f;
constexpr float kLogQ5 = -1.6668057665e-1f;
constexpr float kLogQ6 = 2.0000714765e-1f;
constexpr float kLogQ7 = -2.4999993993e-1f;
constexpr float kLogQ8 = 3.3333331174e-1f;
}  // namespace sp_math

// e^z within 1 ulp (denormal results rounded once), 0 for z <= -104 and -inf, +inf for
// z >= 89, the quiet NaN kNaN for NaN.
SP_RS_FN float SpExp(float z) {
  using namespace sp_math;  // NOLINT(build/namespaces)
  if (!(z == z)) return RsFloat(kNaN);
  z = z < kExpLo ? kExpLo : z;
  z = z > kExpHi ? kExpHi : z;
  const float t = RsFma(z, kLog2E, kRound);  // an integer + 1.5 * 2^23
  const float n = RsAdd(t, -kRound);
  float r = RsFma(n, -kLn2Hi, z);  // exact
  r = RsFma(n, -kLn2Lo, r);
  float p = RsFma(kExpP0, r, kExpP1);
  p = RsFma(p, r, kExpP2);
  p = RsFma(p, r, kExpP3);
  p = RsFma(p, r, kExpP4);
  p = RsFma(p, r, kExpP5);
  p = RsFma(p, r, 1.0f);
  const float y = RsFma(p, r, 1.0f);  // e^r in [0.7, 1.42]
  // y * 2^n as y * 2^a * 2^b, a + b = n, both in [-75, 64]: the first product is exact
  // (normal), the second rounds once (also to a denormal or to infinity).
  const int32_t k = static_cast<int32_t>(RsBits(t) - kRoundBits);
  const int32_t a = k >> 1;
  const int32_t b = k - a;
  const float sa = RsFloat(static_cast<uint32_t>(a + 127) << 23);
  const float sb = RsFloat(static_cast<uint32_t>(b + 127) << 23);
  return RsMul(RsMul(y, sa), sb);
}

// log(x) within 2 ulp for x > 0 (denormals included), -inf for +-0, +inf for +inf, the
// quiet NaN kNaN for x < 0 and NaN.
SP_RS_FN float SpLog(float x) {
  using namespace sp_math;  // NOLINT(build/namespaces)
  if (!(x > 0.0f)) return RsFloat(x == 0.0f ? kMinusInf : kNaN);
  if (RsBits(x) >= kInf) return x;
  float e_bias = 0.0f;
  if (RsBits(x) < kMinNormalBits) {
    x = RsMul(x, kTwo23);
    e_bias = -23.0f;
  }
  const uint32_t t = RsBits(x) - kSqrtHalfBits;
  const float e = RsAdd(static_cast<float>(static_cast<int32_t>(t) >> 23), e_bias);
  const float f = RsAdd(RsFloat((t & 0x007FFFFFu) + kSqrtHalfBits), -1.0f);
  const float z = RsMul(f, f);
  float q = RsFma(kLogQ0, f, kLogQ1);
  q = RsFma(q, f, kLogQ2);
  q = RsFma(q, f, kLogQ3);
  q = RsFma(q, f, kLogQ4);
  q = RsFma(q, f, kLogQ5);
  q = RsFma(q, f, kLogQ6);
  q = RsFma(q, f, kLogQ7);
  q = RsFma(q, f, kLogQ8);
  q = RsFma(q, f, -0.5f);
  float r = RsFma(q, z, f);  // log(1 + f)
  r = RsFma(e, kLn2Lo, r);
  return RsFma(e, kLn2Hi, r);
}

// The uniform of token i: U = (bits + 1/2) / 2^24 in (0, 1), rounded to a float (to
// the even neighbour above 2^23), at most 1 - 2^-24: bits + 1/2 = 2^24 - 1/2 would round
// to 2^24, U to 1, and the noise to +infinity (a token that wins whatever its logit).
SP_RS_FN float RaceUniform(uint64_t key, int32_t i) {
  const float b = RsAdd(static_cast<float>(RaceBits(key, i)), 0.5f);
  return RsMul(b < 16777215.0f ? b : 16777215.0f, 1.0f / 16777216.0f);
}

// The race noise of token i: -log(-log(U)).
SP_RS_FN float RaceNoiseAt(uint64_t key, int32_t i) { return -SpLog(-SpLog(RaceUniform(key, i))); }

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

// The host reference: the token the kernel draws for row x[0..V), bitwise (SpExp,
// SpLog: the same arithmetic on both). The host sampler (engine/runtime/sampler.h) draws the
// same token, bitwise, for every temperature request; with top-k it is this draw over
// the row with every token outside the top k at -infinity.
int32_t SampleRowReference(const float* x, int32_t V, const RowSampling& s);

}  // namespace superpose::engine
