#include "engine/row_math.h"

// GCC 12 flags the placeholder operand inside _mm512_castps512_ps256 / extractf64x4 as
// uninitialized in unoptimised (sanitizer) builds; it is never read.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>

#include "engine/row_sampling.h"

extern "C" __m512 _ZGVeN16v_expf(__m512 x);
extern "C" __m256 _ZGVdN8v_expf(__m256 x);

namespace superpose::engine {
namespace {

__attribute__((target("avx512f"))) double ScaledExp16(const float* x, int32_t n, float scale,
                                                      float shift, float* out) {
  const __m512 s = _mm512_set1_ps(scale), b = _mm512_set1_ps(shift);
  __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
  for (int32_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    // Lanes past the end compute exp(-shift) and are masked out of the store and sum.
    const __m512 e =
        _ZGVeN16v_expf(_mm512_sub_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), s), b));
    if (out != nullptr) _mm512_mask_storeu_ps(out + i, m, e);
    const __m512 z = _mm512_maskz_mov_ps(m, e);
    lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(z)));
    hi = _mm512_add_pd(
        hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(z), 1))));
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
}

__attribute__((target("avx2,fma"))) double ScaledExp8(const float* x, int32_t n, float scale,
                                                      float shift, float* out) {
  const __m256 s = _mm256_set1_ps(scale), b = _mm256_set1_ps(shift);
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
  for (int32_t i = 0; i < n; i += 8) {
    alignas(32) float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const int32_t m = n - i >= 8 ? 8 : n - i;
    const float* src = x + i;
    if (m < 8) {
      for (int32_t j = 0; j < m; ++j) tail[j] = x[i + j];
      src = tail;
    }
    __m256 e = _ZGVdN8v_expf(_mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(src), s), b));
    if (m < 8) {
      alignas(32) float t[8];
      _mm256_store_ps(t, e);
      for (int32_t j = m; j < 8; ++j) t[j] = 0.0f;
      if (out != nullptr) {
        for (int32_t j = 0; j < m; ++j) out[i + j] = t[j];
      }
      e = _mm256_load_ps(t);
    } else if (out != nullptr) {
      _mm256_storeu_ps(out + i, e);
    }
    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
  }
  alignas(32) double r[4];
  _mm256_store_pd(r, _mm256_add_pd(lo, hi));
  return (r[0] + r[1]) + (r[2] + r[3]);
}

double ScaledExp1(const float* x, int32_t n, float scale, float shift, float* out) {
  double sum = 0.0;
  for (int32_t i = 0; i < n; ++i) {
    const float e = std::exp(x[i] * scale - shift);
    if (out != nullptr) out[i] = e;
    sum += e;
  }
  return sum;
}

__attribute__((target("avx512f"))) float Max16(const float* x, int32_t n) {
  __m512 m0 = _mm512_set1_ps(x[0]), m1 = m0, m2 = m0, m3 = m0;
  int32_t i = 0;
  for (; i + 64 <= n; i += 64) {
    m0 = _mm512_max_ps(m0, _mm512_loadu_ps(x + i));
    m1 = _mm512_max_ps(m1, _mm512_loadu_ps(x + i + 16));
    m2 = _mm512_max_ps(m2, _mm512_loadu_ps(x + i + 32));
    m3 = _mm512_max_ps(m3, _mm512_loadu_ps(x + i + 48));
  }
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    m0 = _mm512_mask_max_ps(m0, m, m0, _mm512_maskz_loadu_ps(m, x + i));
  }
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
}

float Max1(const float* x, int32_t n) {
  // Independent chains, so that the compares overlap.
  float m[8];
  for (float& v : m) v = x[0];
  int32_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int32_t j = 0; j < 8; ++j) m[j] = x[i + j] > m[j] ? x[i + j] : m[j];
  }
  for (; i < n; ++i) m[0] = x[i] > m[0] ? x[i] : m[0];
  float r = m[0];
  for (float v : m) r = v > r ? v : r;
  return r;
}

bool HasAvx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
}

bool HasAvx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// The race skips the logs of a token that cannot win. With bar the best score so far,
// a token wins only if its noise -log(-log u), which increases with u, exceeds
// t = bar - z. kSkip[k] = exp(-exp(-(k / 2 - 1e-3))) (rounded down) is the u at which
// the noise reaches k / 2 - 1e-3: a token with t >= k / 2 and u < kSkip[k] has a noise
// below t - 1e-3 (SpLog's errors move it by less than 1e-5), so its score z + noise
// rounds below bar (|bar| < 2^10 wherever kSkip[k] exceeds the smallest uniform): it
// neither wins nor ties a token of lower id.
struct SkipTable {
  alignas(64) float u[32];
  SkipTable() {
    for (int k = 0; k < 32; ++k) {
      const double b = std::exp(-std::exp(-(k * 0.5 - 1e-3)));
      u[k] = std::nextafter(static_cast<float>(b), 0.0f);
    }
  }
};
const SkipTable kSkip;

// The uniform below which a token at z cannot beat bar (0: none, for t < 0 or NaN).
inline float SkipBound(float bar, float z) {
  const float t = (bar - z - 1e-4f) * 2.0f;  // 2 t, less a margin for its rounding
  if (!(t >= 0.0f)) return 0.0f;
  return kSkip.u[static_cast<int>(std::min(t, 31.0f))];
}

// The race's state: the best token so far.
struct RaceState {
  int32_t best = -1;
  float score = -__builtin_inff();
};

// One token of the race in scalar form, the ids ascending (a later token must score
// strictly higher to win).
inline void ScalarRaceStep(const float* x, int32_t i, float inv_t, float mx, uint64_t key,
                           const RaceFilter& f, RaceState* st) {
  const float z = ScaledLogit(x[i], inv_t, mx);
  if (!(z >= f.z_floor)) return;
  const float u = RaceUniform(key, i);
  if (u < SkipBound(st->score, z)) return;
  const uint32_t k = RankKey(x[i]);
  if (!(k > f.cut_key || (k == f.cut_key && i <= f.cut_last))) return;
  if (f.min_p > 0.0f && !(SpExp(z) >= f.min_p)) return;
  const float score = z + -SpLog(-SpLog(u));  // z + RaceNoiseAt(key, i)
  if (score > st->score) {
    st->best = i;
    st->score = score;
  }
}

// One token of WeighRow in scalar form.
inline void ScalarWeighStep(const float* x, int32_t i, float inv_t, float mx, float min_p,
                            KeptMasses* out, double* total) {
  const float w = SpExp(ScaledLogit(x[i], inv_t, mx));
  if (!(w >= min_p)) return;
  const float m = std::floor(w * 4294967296.0f);  // FixedMass(w), exactly
  if (!(m > 0.0f)) return;
  out->ids[out->count] = i;
  out->keys[out->count] = RankKey(x[i]);
  out->mass[out->count] = m;
  ++out->count;
  *total += m;
}

// ---- SpExp, SpLog and the race in vector form: the scalar functions' operations lane
// by lane (explicit fmas; the one plain product that an add follows, in ScaledLogit, is
// kept in a register by an empty asm so that the compiler cannot fuse it). Tails (fewer
// tokens than a vector) run the scalar functions themselves.

#define SP_AVX512 __attribute__((target("avx512f,avx512dq")))
#define SP_AVX2 __attribute__((target("avx2,fma")))

namespace avx512 {

SP_AVX512 inline __m512 Exp(__m512 z) {
  using namespace sp_math;  // NOLINT(build/namespaces)
  const __mmask16 nan = _mm512_cmp_ps_mask(z, z, _CMP_UNORD_Q);
  z = _mm512_max_ps(z, _mm512_set1_ps(kExpLo));
  z = _mm512_min_ps(z, _mm512_set1_ps(kExpHi));
  const __m512 t = _mm512_fmadd_ps(z, _mm512_set1_ps(kLog2E), _mm512_set1_ps(kRound));
  const __m512 n = _mm512_add_ps(t, _mm512_set1_ps(-kRound));
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-kLn2Hi), z);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(-kLn2Lo), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kExpP0), r, _mm512_set1_ps(kExpP1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP5));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512 y = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512i k =
      _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(static_cast<int>(kRoundBits)));
  const __m512i a = _mm512_srai_epi32(k, 1);
  const __m512i b = _mm512_sub_epi32(k, a);
  const __m512i bias = _mm512_set1_epi32(127);
  const __m512 sa = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(a, bias), 23));
  const __m512 sb = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(b, bias), 23));
  const __m512 e = _mm512_mul_ps(_mm512_mul_ps(y, sa), sb);
  return _mm512_mask_blend_ps(nan, e, _mm512_castsi512_ps(_mm512_set1_epi32(kNaN)));
}

SP_AVX512 inline __m512 Log(__m512 x) {
  using namespace sp_math;  // NOLINT(build/namespaces)
  const __m512 zero = _mm512_setzero_ps(), inf = _mm512_castsi512_ps(_mm512_set1_epi32(kInf));
  const __mmask16 ok =
      _mm512_cmp_ps_mask(x, zero, _CMP_GT_OQ) & _mm512_cmp_ps_mask(x, inf, _CMP_LT_OQ);
  const __mmask16 is_zero = _mm512_cmp_ps_mask(x, zero, _CMP_EQ_OQ);
  const __mmask16 is_inf = _mm512_cmp_ps_mask(x, inf, _CMP_EQ_OQ);
  const __mmask16 den = _mm512_mask_cmplt_epi32_mask(
      ok, _mm512_castps_si512(x), _mm512_set1_epi32(static_cast<int>(kMinNormalBits)));
  x = _mm512_mask_mul_ps(x, den, x, _mm512_set1_ps(kTwo23));
  const __m512 e_bias = _mm512_maskz_mov_ps(den, _mm512_set1_ps(-23.0f));
  const __m512i half = _mm512_set1_epi32(static_cast<int>(kSqrtHalfBits));
  const __m512i t = _mm512_sub_epi32(_mm512_castps_si512(x), half);
  const __m512 e = _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(t, 23)), e_bias);
  const __m512 f = _mm512_add_ps(_mm512_castsi512_ps(_mm512_add_epi32(
                                     _mm512_and_si512(t, _mm512_set1_epi32(0x007FFFFF)), half)),
                                 _mm512_set1_ps(-1.0f));
  const __m512 z = _mm512_mul_ps(f, f);
  __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(kLogQ0), f, _mm512_set1_ps(kLogQ1));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(kLogQ2));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(kLogQ3));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(kLogQ4));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(kLogQ5));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(kLogQ6));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(kLogQ7));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(kLogQ8));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(-0.5f));
  __m512 r = _mm512_fmadd_ps(q, z, f);
  r = _mm512_fmadd_ps(e, _mm512_set1_ps(kLn2Lo), r);
  r = _mm512_fmadd_ps(e, _mm512_set1_ps(kLn2Hi), r);
  __m512 special = _mm512_castsi512_ps(_mm512_set1_epi32(kNaN));
  special =
      _mm512_mask_blend_ps(is_zero, special, _mm512_castsi512_ps(_mm512_set1_epi32(kMinusInf)));
  special = _mm512_mask_blend_ps(is_inf, special, inf);
  return _mm512_mask_blend_ps(ok, special, r);
}

// ScaledLogit(x, inv_t, mx): the product rounded on its own.
SP_AVX512 inline __m512 Scaled(__m512 x, __m512 inv_t, __m512 mx) {
  __m512 p = _mm512_mul_ps(x, inv_t);
  __asm__("" : "+v"(p));
  return _mm512_sub_ps(p, mx);
}

SP_AVX512 inline __m512i RankKey(__m512 x) {
  const __m512i u = _mm512_castps_si512(_mm512_add_ps(x, _mm512_setzero_ps()));
  return _mm512_xor_si512(u, _mm512_or_si512(_mm512_srai_epi32(u, 31),
                                             _mm512_set1_epi32(static_cast<int>(0x80000000u))));
}

SP_AVX512 inline __m512i Mix64(__m512i z) {
  z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)),
                         _mm512_set1_epi64(static_cast<int64_t>(0xBF58476D1CE4E5B9ull)));
  z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)),
                         _mm512_set1_epi64(static_cast<int64_t>(0x94D049BB133111EBull)));
  return _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
}

// RaceUniform for the 16 tokens whose splitmix64 inputs are h_lo (tokens 0..7) and h_hi.
SP_AVX512 inline __m512 Uniform(__m512i h_lo, __m512i h_hi) {
  const __m256i b_lo = _mm512_cvtepi64_epi32(_mm512_srli_epi64(Mix64(h_lo), 40));
  const __m256i b_hi = _mm512_cvtepi64_epi32(_mm512_srli_epi64(Mix64(h_hi), 40));
  const __m512 bits = _mm512_cvtepi32_ps(_mm512_inserti64x4(_mm512_castsi256_si512(b_lo), b_hi, 1));
  __m512 b = _mm512_add_ps(bits, _mm512_set1_ps(0.5f));
  b = _mm512_min_ps(b, _mm512_set1_ps(16777215.0f));
  return _mm512_mul_ps(b, _mm512_set1_ps(1.0f / 16777216.0f));
}

// RaceNoiseAt from the uniform.
SP_AVX512 inline __m512 Noise(__m512 u) {
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(0x80000000u)));
  const __m512 l = Log(_mm512_xor_ps(Log(u), sign));
  return _mm512_xor_ps(l, sign);
}

// SkipBound for 16 tokens (table: kSkip.u[0..16) and [16..32)).
SP_AVX512 inline __m512 SkipBound(__m512 bar, __m512 z, __m512 tab_lo, __m512 tab_hi) {
  const __m512 zero = _mm512_setzero_ps();
  const __m512 t = _mm512_mul_ps(_mm512_sub_ps(_mm512_sub_ps(bar, z), _mm512_set1_ps(1e-4f)),
                                 _mm512_set1_ps(2.0f));
  const __mmask16 valid = _mm512_cmp_ps_mask(t, zero, _CMP_GE_OQ);
  const __m512 tc = _mm512_min_ps(_mm512_max_ps(t, zero), _mm512_set1_ps(31.0f));
  const __m512 u = _mm512_permutex2var_ps(tab_lo, _mm512_cvttps_epi32(tc), tab_hi);
  return _mm512_maskz_mov_ps(valid, u);
}

SP_AVX512 void ExpRow(const float* x, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, Exp(_mm512_loadu_ps(x + i)));
  for (; i < n; ++i) out[i] = SpExp(x[i]);
}

SP_AVX512 void LogRow(const float* x, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, Log(_mm512_loadu_ps(x + i)));
  for (; i < n; ++i) out[i] = SpLog(x[i]);
}

SP_AVX512 int32_t FirstIndex(const float* x, int32_t n, float v) {
  const __m512 vv = _mm512_set1_ps(v);
  int32_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const uint32_t m = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), vv, _CMP_EQ_OQ);
    if (m != 0) return i + __builtin_ctz(m);
  }
  for (; i < n; ++i) {
    if (x[i] == v) return i;
  }
  return n;
}

SP_AVX512 int32_t Race(const float* x, int32_t V, float inv_t, float mx, uint64_t key,
                       const RaceFilter& f) {
  constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ull;
  const __m512 s = _mm512_set1_ps(inv_t), m = _mm512_set1_ps(mx);
  const __m512 floor = _mm512_set1_ps(f.z_floor), min_p = _mm512_set1_ps(f.min_p);
  const __m512i cut_key = _mm512_set1_epi32(static_cast<int>(f.cut_key));
  const __m512i cut_last = _mm512_set1_epi32(f.cut_last);
  const bool test_min_p = f.min_p > 0.0f, cut = f.cut_key != 0 || f.cut_last != INT32_MAX;
  const __m512i step = _mm512_set1_epi64(static_cast<int64_t>(16 * kGamma));
  __m512i h_lo = _mm512_set_epi64(8, 7, 6, 5, 4, 3, 2, 1);
  __m512i h_hi = _mm512_set_epi64(16, 15, 14, 13, 12, 11, 10, 9);
  h_lo = _mm512_add_epi64(_mm512_mullo_epi64(h_lo, _mm512_set1_epi64(kGamma)),
                          _mm512_set1_epi64(static_cast<int64_t>(key)));
  h_hi = _mm512_add_epi64(_mm512_mullo_epi64(h_hi, _mm512_set1_epi64(kGamma)),
                          _mm512_set1_epi64(static_cast<int64_t>(key)));
  __m512i id = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i sixteen = _mm512_set1_epi32(16);
  __m512 best = _mm512_set1_ps(-__builtin_inff());
  __m512i best_id = _mm512_set1_epi32(INT32_MAX);
  float bar = -__builtin_inff();  // the best score of the lanes
  __m512 bar_v = _mm512_set1_ps(bar);
  const __m512 tab_lo = _mm512_load_ps(kSkip.u), tab_hi = _mm512_load_ps(kSkip.u + 16);
  int32_t i = 0;
  for (; i + 16 <= V; i += 16) {
    const __m512 xv = _mm512_loadu_ps(x + i);
    const __m512 z = Scaled(xv, s, m);
    __mmask16 live = _mm512_cmp_ps_mask(z, floor, _CMP_GE_OQ);
    __m512 u;
    if (live != 0) {
      u = Uniform(h_lo, h_hi);
      live = _mm512_mask_cmp_ps_mask(live, u, SkipBound(bar_v, z, tab_lo, tab_hi), _CMP_GE_OQ);
    }
    if (live != 0 && cut) {
      const __m512i k = RankKey(xv);
      live &= _mm512_cmpgt_epu32_mask(k, cut_key) |
              (_mm512_cmpeq_epi32_mask(k, cut_key) & _mm512_cmple_epi32_mask(id, cut_last));
    }
    if (live != 0 && test_min_p) live &= _mm512_cmp_ps_mask(Exp(z), min_p, _CMP_GE_OQ);
    if (live != 0) {
      const __m512 score = _mm512_add_ps(z, Noise(u));
      const __mmask16 up = _mm512_mask_cmp_ps_mask(live, score, best, _CMP_GT_OQ);
      if (up != 0) {
        best = _mm512_mask_mov_ps(best, up, score);
        best_id = _mm512_mask_mov_epi32(best_id, up, id);
        const float top = _mm512_reduce_max_ps(best);
        if (top > bar) {
          bar = top;
          bar_v = _mm512_set1_ps(bar);
        }
      }
    }
    h_lo = _mm512_add_epi64(h_lo, step);
    h_hi = _mm512_add_epi64(h_hi, step);
    id = _mm512_add_epi32(id, sixteen);
  }
  const __mmask16 at_top = _mm512_cmp_ps_mask(best, _mm512_set1_ps(bar), _CMP_EQ_OQ);
  RaceState st;
  if (bar > -__builtin_inff()) st = {_mm512_mask_reduce_min_epi32(at_top, best_id), bar};
  for (; i < V; ++i) ScalarRaceStep(x, i, inv_t, mx, key, f, &st);
  return st.best;
}

SP_AVX512 void Weigh(const float* x, int32_t V, float inv_t, float mx, float min_p,
                     KeptMasses* out) {
  const __m512 s = _mm512_set1_ps(inv_t), m = _mm512_set1_ps(mx), mp = _mm512_set1_ps(min_p);
  const __m512 two32 = _mm512_set1_ps(4294967296.0f), zero = _mm512_setzero_ps();
  __m512i id = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
  int32_t n = 0, i = 0;
  for (; i + 16 <= V; i += 16) {
    const __m512 xv = _mm512_loadu_ps(x + i);
    const __m512 w = Exp(Scaled(xv, s, m));
    const __mmask16 kept = _mm512_cmp_ps_mask(w, mp, _CMP_GE_OQ);
    const __m512 mass =
        _mm512_roundscale_ps(_mm512_mul_ps(w, two32), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __mmask16 pos = _mm512_mask_cmp_ps_mask(kept, mass, zero, _CMP_GT_OQ);
    if (pos != 0) {
      _mm512_mask_compressstoreu_epi32(out->ids.data() + n, pos, id);
      _mm512_mask_compressstoreu_epi32(out->keys.data() + n, pos, RankKey(xv));
      _mm512_mask_compressstoreu_ps(out->mass.data() + n, pos, mass);
      n += __builtin_popcount(pos);
      const __m512 z = _mm512_maskz_mov_ps(pos, mass);
      lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(z)));
      hi = _mm512_add_pd(
          hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(z), 1))));
    }
    id = _mm512_add_epi32(id, _mm512_set1_epi32(16));
  }
  out->count = n;
  double total = _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));  // integers below 2^53: exact
  for (; i < V; ++i) ScalarWeighStep(x, i, inv_t, mx, min_p, out, &total);
  out->total = static_cast<uint64_t>(total);
}

}  // namespace avx512

namespace avx2 {

SP_AVX2 inline __m256 Bits(uint32_t u) {
  return _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(u)));
}

SP_AVX2 inline __m256 Exp(__m256 z) {
  using namespace sp_math;  // NOLINT(build/namespaces)
  const __m256 nan = _mm256_cmp_ps(z, z, _CMP_UNORD_Q);
  z = _mm256_max_ps(z, _mm256_set1_ps(kExpLo));
  z = _mm256_min_ps(z, _mm256_set1_ps(kExpHi));
  const __m256 t = _mm256_fmadd_ps(z, _mm256_set1_ps(kLog2E), _mm256_set1_ps(kRound));
  const __m256 n = _mm256_add_ps(t, _mm256_set1_ps(-kRound));
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-kLn2Hi), z);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(-kLn2Lo), r);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kExpP0), r, _mm256_set1_ps(kExpP1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP5));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256 y = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i k =
      _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(static_cast<int>(kRoundBits)));
  const __m256i a = _mm256_srai_epi32(k, 1);
  const __m256i b = _mm256_sub_epi32(k, a);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 sa = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(a, bias), 23));
  const __m256 sb = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(b, bias), 23));
  const __m256 e = _mm256_mul_ps(_mm256_mul_ps(y, sa), sb);
  return _mm256_blendv_ps(e, Bits(kNaN), nan);
}

SP_AVX2 inline __m256 Log(__m256 x) {
  using namespace sp_math;  // NOLINT(build/namespaces)
  const __m256 zero = _mm256_setzero_ps(), inf = Bits(kInf);
  const __m256 ok =
      _mm256_and_ps(_mm256_cmp_ps(x, zero, _CMP_GT_OQ), _mm256_cmp_ps(x, inf, _CMP_LT_OQ));
  const __m256 is_zero = _mm256_cmp_ps(x, zero, _CMP_EQ_OQ);
  const __m256 is_inf = _mm256_cmp_ps(x, inf, _CMP_EQ_OQ);
  const __m256 den = _mm256_and_ps(
      ok, _mm256_castsi256_ps(_mm256_cmpgt_epi32(
              _mm256_set1_epi32(static_cast<int>(kMinNormalBits)), _mm256_castps_si256(x))));
  x = _mm256_blendv_ps(x, _mm256_mul_ps(x, _mm256_set1_ps(kTwo23)), den);
  const __m256 e_bias = _mm256_and_ps(den, _mm256_set1_ps(-23.0f));
  const __m256i half = _mm256_set1_epi32(static_cast<int>(kSqrtHalfBits));
  const __m256i t = _mm256_sub_epi32(_mm256_castps_si256(x), half);
  const __m256 e = _mm256_add_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(t, 23)), e_bias);
  const __m256 f = _mm256_add_ps(_mm256_castsi256_ps(_mm256_add_epi32(
                                     _mm256_and_si256(t, _mm256_set1_epi32(0x007FFFFF)), half)),
                                 _mm256_set1_ps(-1.0f));
  const __m256 z = _mm256_mul_ps(f, f);
  __m256 q = _mm256_fmadd_ps(_mm256_set1_ps(kLogQ0), f, _mm256_set1_ps(kLogQ1));
  q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(kLogQ2));
  q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(kLogQ3));
  q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(kLogQ4));
  q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(kLogQ5));
  q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(kLogQ6));
  q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(kLogQ7));
  q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(kLogQ8));
  q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(-0.5f));
  __m256 r = _mm256_fmadd_ps(q, z, f);
  r = _mm256_fmadd_ps(e, _mm256_set1_ps(kLn2Lo), r);
  r = _mm256_fmadd_ps(e, _mm256_set1_ps(kLn2Hi), r);
  __m256 special = _mm256_blendv_ps(Bits(kNaN), Bits(kMinusInf), is_zero);
  special = _mm256_blendv_ps(special, inf, is_inf);
  return _mm256_blendv_ps(special, r, ok);
}

SP_AVX2 inline __m256 Scaled(__m256 x, __m256 inv_t, __m256 mx) {
  __m256 p = _mm256_mul_ps(x, inv_t);
  __asm__("" : "+x"(p));
  return _mm256_sub_ps(p, mx);
}

SP_AVX2 inline __m256i RankKey(__m256 x) {
  const __m256i u = _mm256_castps_si256(_mm256_add_ps(x, _mm256_setzero_ps()));
  return _mm256_xor_si256(u, _mm256_or_si256(_mm256_srai_epi32(u, 31),
                                             _mm256_set1_epi32(static_cast<int>(0x80000000u))));
}

// a * c mod 2^64 per 64-bit lane.
SP_AVX2 inline __m256i Mul64(__m256i a, uint64_t c) {
  const __m256i c_lo = _mm256_set1_epi64x(static_cast<int64_t>(c & 0xFFFFFFFFu));
  const __m256i c_hi = _mm256_set1_epi64x(static_cast<int64_t>(c >> 32));
  const __m256i cross =
      _mm256_add_epi64(_mm256_mul_epu32(_mm256_srli_epi64(a, 32), c_lo), _mm256_mul_epu32(a, c_hi));
  return _mm256_add_epi64(_mm256_mul_epu32(a, c_lo), _mm256_slli_epi64(cross, 32));
}

SP_AVX2 inline __m256i Mix64(__m256i z) {
  z = Mul64(_mm256_xor_si256(z, _mm256_srli_epi64(z, 30)), 0xBF58476D1CE4E5B9ull);
  z = Mul64(_mm256_xor_si256(z, _mm256_srli_epi64(z, 27)), 0x94D049BB133111EBull);
  return _mm256_xor_si256(z, _mm256_srli_epi64(z, 31));
}

SP_AVX2 inline __m256 Uniform(__m256i h_lo, __m256i h_hi) {
  const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  const __m256i b_lo = _mm256_permutevar8x32_epi32(_mm256_srli_epi64(Mix64(h_lo), 40), even);
  const __m256i b_hi = _mm256_permutevar8x32_epi32(_mm256_srli_epi64(Mix64(h_hi), 40), even);
  const __m256 bits = _mm256_cvtepi32_ps(_mm256_permute2x128_si256(b_lo, b_hi, 0x20));
  __m256 b = _mm256_add_ps(bits, _mm256_set1_ps(0.5f));
  b = _mm256_min_ps(b, _mm256_set1_ps(16777215.0f));
  return _mm256_mul_ps(b, _mm256_set1_ps(1.0f / 16777216.0f));
}

SP_AVX2 inline __m256 Noise(__m256 u) {
  const __m256 sign = Bits(0x80000000u);
  return _mm256_xor_ps(Log(_mm256_xor_ps(Log(u), sign)), sign);
}

// SkipBound for 8 tokens.
SP_AVX2 inline __m256 SkipBound(__m256 bar, __m256 z) {
  const __m256 zero = _mm256_setzero_ps();
  const __m256 t = _mm256_mul_ps(_mm256_sub_ps(_mm256_sub_ps(bar, z), _mm256_set1_ps(1e-4f)),
                                 _mm256_set1_ps(2.0f));
  const __m256 valid = _mm256_cmp_ps(t, zero, _CMP_GE_OQ);
  const __m256 tc = _mm256_min_ps(_mm256_max_ps(t, zero), _mm256_set1_ps(31.0f));
  const __m256 u = _mm256_i32gather_ps(kSkip.u, _mm256_cvttps_epi32(tc), 4);
  return _mm256_and_ps(valid, u);
}

SP_AVX2 void ExpRow(const float* x, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, Exp(_mm256_loadu_ps(x + i)));
  for (; i < n; ++i) out[i] = SpExp(x[i]);
}

SP_AVX2 void LogRow(const float* x, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, Log(_mm256_loadu_ps(x + i)));
  for (; i < n; ++i) out[i] = SpLog(x[i]);
}

SP_AVX2 int32_t FirstIndex(const float* x, int32_t n, float v) {
  const __m256 vv = _mm256_set1_ps(v);
  int32_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const int m = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), vv, _CMP_EQ_OQ));
    if (m != 0) return i + __builtin_ctz(static_cast<unsigned>(m));
  }
  for (; i < n; ++i) {
    if (x[i] == v) return i;
  }
  return n;
}

SP_AVX2 int32_t Race(const float* x, int32_t V, float inv_t, float mx, uint64_t key,
                     const RaceFilter& f) {
  constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ull;
  const __m256 s = _mm256_set1_ps(inv_t), m = _mm256_set1_ps(mx);
  const __m256 floor = _mm256_set1_ps(f.z_floor), min_p = _mm256_set1_ps(f.min_p);
  const __m256i flip = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  // Unsigned k > cut_key as signed compares of k ^ 2^31.
  const __m256i cut_key = _mm256_xor_si256(_mm256_set1_epi32(static_cast<int>(f.cut_key)), flip);
  const __m256i cut_key_raw = _mm256_set1_epi32(static_cast<int>(f.cut_key));
  const __m256i cut_last = _mm256_set1_epi32(f.cut_last);
  const bool test_min_p = f.min_p > 0.0f, cut = f.cut_key != 0 || f.cut_last != INT32_MAX;
  const __m256i step = _mm256_set1_epi64x(static_cast<int64_t>(8 * kGamma));
  const __m256i k64 = _mm256_set1_epi64x(static_cast<int64_t>(key));
  __m256i h_lo = _mm256_add_epi64(Mul64(_mm256_setr_epi64x(1, 2, 3, 4), kGamma), k64);
  __m256i h_hi = _mm256_add_epi64(Mul64(_mm256_setr_epi64x(5, 6, 7, 8), kGamma), k64);
  __m256i id = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 best = _mm256_set1_ps(-__builtin_inff());
  __m256i best_id = _mm256_set1_epi32(INT32_MAX);
  float bar = -__builtin_inff();  // the best score of the lanes
  __m256 bar_v = _mm256_set1_ps(bar);
  int32_t i = 0;
  for (; i + 8 <= V; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    const __m256 z = Scaled(xv, s, m);
    __m256 live = _mm256_cmp_ps(z, floor, _CMP_GE_OQ);
    __m256 u = _mm256_setzero_ps();
    if (_mm256_movemask_ps(live) != 0) {
      u = Uniform(h_lo, h_hi);
      live = _mm256_and_ps(live, _mm256_cmp_ps(u, SkipBound(bar_v, z), _CMP_GE_OQ));
    }
    if (_mm256_movemask_ps(live) != 0 && cut) {
      const __m256i k = RankKey(xv);
      const __m256i above = _mm256_cmpgt_epi32(_mm256_xor_si256(k, flip), cut_key);
      // k == cut_key and not id > cut_last
      const __m256i equal =
          _mm256_andnot_si256(_mm256_cmpgt_epi32(id, cut_last), _mm256_cmpeq_epi32(k, cut_key_raw));
      live = _mm256_and_ps(live, _mm256_castsi256_ps(_mm256_or_si256(above, equal)));
    }
    if (_mm256_movemask_ps(live) != 0 && test_min_p) {
      live = _mm256_and_ps(live, _mm256_cmp_ps(Exp(z), min_p, _CMP_GE_OQ));
    }
    if (_mm256_movemask_ps(live) != 0) {
      const __m256 score = _mm256_add_ps(z, Noise(u));
      const __m256 up = _mm256_and_ps(live, _mm256_cmp_ps(score, best, _CMP_GT_OQ));
      if (_mm256_movemask_ps(up) != 0) {
        best = _mm256_blendv_ps(best, score, up);
        best_id = _mm256_castps_si256(
            _mm256_blendv_ps(_mm256_castsi256_ps(best_id), _mm256_castsi256_ps(id), up));
        __m128 t = _mm_max_ps(_mm256_castps256_ps128(best), _mm256_extractf128_ps(best, 1));
        t = _mm_max_ps(t, _mm_movehl_ps(t, t));
        t = _mm_max_ss(t, _mm_movehdup_ps(t));
        const float top = _mm_cvtss_f32(t);
        if (top > bar) {
          bar = top;
          bar_v = _mm256_set1_ps(bar);
        }
      }
    }
    h_lo = _mm256_add_epi64(h_lo, step);
    h_hi = _mm256_add_epi64(h_hi, step);
    id = _mm256_add_epi32(id, _mm256_set1_epi32(8));
  }
  alignas(32) float bs[8];
  alignas(32) int32_t bi[8];
  _mm256_store_ps(bs, best);
  _mm256_store_si256(reinterpret_cast<__m256i*>(bi), best_id);
  int32_t win = -1;
  for (int j = 0; j < 8; ++j) {
    if (bs[j] == bar && bar > -__builtin_inff() && (win < 0 || bi[j] < win)) win = bi[j];
  }
  RaceState st;
  if (win >= 0) st = {win, bar};
  for (; i < V; ++i) ScalarRaceStep(x, i, inv_t, mx, key, f, &st);
  return st.best;
}

SP_AVX2 void Weigh(const float* x, int32_t V, float inv_t, float mx, float min_p, KeptMasses* out) {
  const __m256 s = _mm256_set1_ps(inv_t), m = _mm256_set1_ps(mx), mp = _mm256_set1_ps(min_p);
  const __m256 two32 = _mm256_set1_ps(4294967296.0f), zero = _mm256_setzero_ps();
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
  int32_t n = 0, i = 0;
  for (; i + 8 <= V; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    const __m256 w = Exp(Scaled(xv, s, m));
    const __m256 mass = _mm256_floor_ps(_mm256_mul_ps(w, two32));
    const __m256 pos =
        _mm256_and_ps(_mm256_cmp_ps(w, mp, _CMP_GE_OQ), _mm256_cmp_ps(mass, zero, _CMP_GT_OQ));
    unsigned bits = static_cast<unsigned>(_mm256_movemask_ps(pos));
    if (bits == 0) continue;
    alignas(32) float ms[8];
    alignas(32) uint32_t ks[8];
    _mm256_store_ps(ms, mass);
    _mm256_store_si256(reinterpret_cast<__m256i*>(ks), RankKey(xv));
    while (bits != 0) {
      const int j = __builtin_ctz(bits);
      bits &= bits - 1;
      out->ids[n] = i + j;
      out->keys[n] = ks[j];
      out->mass[n] = ms[j];
      ++n;
    }
    const __m256 z = _mm256_and_ps(pos, mass);
    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(z)));
    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(z, 1)));
  }
  out->count = n;
  alignas(32) double r[4];
  _mm256_store_pd(r, _mm256_add_pd(lo, hi));
  double total = (r[0] + r[1]) + (r[2] + r[3]);  // integers below 2^53: exact
  for (; i < V; ++i) ScalarWeighStep(x, i, inv_t, mx, min_p, out, &total);
  out->total = static_cast<uint64_t>(total);
}

}  // namespace avx2

namespace scalar {

void ExpRow(const float* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = SpExp(x[i]);
}

void LogRow(const float* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = SpLog(x[i]);
}

int32_t FirstIndex(const float* x, int32_t n, float v) {
  return static_cast<int32_t>(std::find(x, x + n, v) - x);
}

int32_t Race(const float* x, int32_t V, float inv_t, float mx, uint64_t key, const RaceFilter& f) {
  RaceState st;
  for (int32_t i = 0; i < V; ++i) ScalarRaceStep(x, i, inv_t, mx, key, f, &st);
  return st.best;
}

void Weigh(const float* x, int32_t V, float inv_t, float mx, float min_p, KeptMasses* out) {
  out->count = 0;
  double total = 0.0;
  for (int32_t i = 0; i < V; ++i) ScalarWeighStep(x, i, inv_t, mx, min_p, out, &total);
  out->total = static_cast<uint64_t>(total);
}

}  // namespace scalar
}  // namespace

double ScaledExp(const float* x, int32_t n, float scale, float shift, float* out) {
  using Fn = double (*)(const float*, int32_t, float, float, float*);
  static const Fn fn = HasAvx512() ? ScaledExp16 : HasAvx2() ? ScaledExp8 : ScaledExp1;
  return fn(x, n, scale, shift, out);
}

float MaxOf(const float* x, int32_t n) {
  static const bool avx512 = HasAvx512();
  return avx512 ? Max16(x, n) : Max1(x, n);
}

namespace {
std::atomic<int> g_isa_for_testing{-1};
}  // namespace

RowIsa BestRowIsa() {
  static const RowIsa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) {
      return RowIsa::kAvx512;
    }
    return HasAvx2() ? RowIsa::kAvx2 : RowIsa::kScalar;
  }();
  return best;
}

RowIsa RowIsaInUse() {
  const int forced = g_isa_for_testing.load(std::memory_order_relaxed);
  return forced < 0 ? BestRowIsa() : static_cast<RowIsa>(forced);
}

void SetRowIsaForTesting(RowIsa isa) {
  g_isa_for_testing.store(static_cast<int>(std::min(isa, BestRowIsa())), std::memory_order_relaxed);
}

void SpExpRow(RowIsa isa, const float* x, int64_t n, float* out) {
  switch (std::min(isa, BestRowIsa())) {
    case RowIsa::kAvx512:
      return avx512::ExpRow(x, n, out);
    case RowIsa::kAvx2:
      return avx2::ExpRow(x, n, out);
    case RowIsa::kScalar:
      return scalar::ExpRow(x, n, out);
  }
}

void SpLogRow(RowIsa isa, const float* x, int64_t n, float* out) {
  switch (std::min(isa, BestRowIsa())) {
    case RowIsa::kAvx512:
      return avx512::LogRow(x, n, out);
    case RowIsa::kAvx2:
      return avx2::LogRow(x, n, out);
    case RowIsa::kScalar:
      return scalar::LogRow(x, n, out);
  }
}

int32_t FirstIndexOf(const float* x, int32_t n, float v) {
  switch (RowIsaInUse()) {
    case RowIsa::kAvx512:
      return avx512::FirstIndex(x, n, v);
    case RowIsa::kAvx2:
      return avx2::FirstIndex(x, n, v);
    case RowIsa::kScalar:
      break;
  }
  return scalar::FirstIndex(x, n, v);
}

int32_t RaceRow(const float* x, int32_t V, float inv_t, float mx, uint64_t key,
                const RaceFilter& filter) {
  switch (RowIsaInUse()) {
    case RowIsa::kAvx512:
      return avx512::Race(x, V, inv_t, mx, key, filter);
    case RowIsa::kAvx2:
      return avx2::Race(x, V, inv_t, mx, key, filter);
    case RowIsa::kScalar:
      break;
  }
  return scalar::Race(x, V, inv_t, mx, key, filter);
}

void WeighRow(const float* x, int32_t V, float inv_t, float mx, float min_p, KeptMasses* out) {
  if (static_cast<int32_t>(out->ids.size()) < V) {
    out->ids.resize(V);
    out->keys.resize(V);
    out->mass.resize(V);
  }
  switch (RowIsaInUse()) {
    case RowIsa::kAvx512:
      return avx512::Weigh(x, V, inv_t, mx, min_p, out);
    case RowIsa::kAvx2:
      return avx2::Weigh(x, V, inv_t, mx, min_p, out);
    case RowIsa::kScalar:
      break;
  }
  scalar::Weigh(x, V, inv_t, mx, min_p, out);
}

}  // namespace superpose::engine
