#include "engine/row_math.h"

// GCC 12 flags the placeholder operand inside _mm512_castps512_ps256 / extractf64x4 as
// uninitialized in unoptimised (sanitizer) builds; it is never read.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cmath>

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

}  // namespace superpose::engine
