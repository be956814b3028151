#include "engine/cpu/attention.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "engine/cpu/small_gemm.h"
#include "engine/cpu/vector_exp.h"
#include "engine/model/weights.h"

namespace superpose::engine::cpu {

void AttnKeys::Append(int64_t block, int32_t slot0, int32_t len, int32_t block_size) {
  for (int32_t s = 0; s < len; ++s) slots.push_back(block * block_size + slot0 + s);
  while (len > 0) {
    if (!runs.empty()) {
      Run& last = runs.back();
      if (last.block == block && last.slot0 + last.len == slot0 && last.len < 16) {
        const int32_t take = std::min(16 - last.len, len);
        last.len += take;
        slot0 += take;
        len -= take;
        continue;
      }
    }
    const int32_t take = std::min(16, len);
    const int32_t pos = runs.empty() ? 0 : runs.back().pos + runs.back().len;
    runs.push_back({block, slot0, take, pos});
    slot0 += take;
    len -= take;
  }
}

namespace {

int32_t MaxOf(const int32_t* v, int32_t n) { return *std::max_element(v, v + n); }

// Row stride of the score buffer: room for a whole run past the last visible key.
size_t ScoreStride(int32_t nk_max) { return static_cast<size_t>((nk_max + 15) / 16 + 1) * 16; }

// ---------------------------------------------------------------------------------
// Portable kernel: the same per-query arithmetic in scalar code (std::fma chains).

inline float ToF32(float x) { return x; }
inline float ToF32(uint16_t x) { return Bf16ToF32(x); }

template <typename T>
void AttendPortable(const KvLayerView& kv, int32_t kvh, const AttnKeys& keys, int32_t n,
                    const float* const* qs, const int32_t* nks, float scale, float* const* outs,
                    AttnScratch* scratch) {
  const T* kl = static_cast<const T*>(kv.k);
  const T* vl = static_cast<const T*>(kv.v);
  const int32_t D = kv.head_dim, bs = kv.block_size, kvn = kv.kv_heads;
  const int32_t nk_max = MaxOf(nks, n);
  scratch->scores.resize(static_cast<size_t>(nk_max) + static_cast<size_t>(D));
  float* sc = scratch->scores.data();
  float* acc = sc + nk_max;
  for (int32_t i = 0; i < n; ++i) {
    const float* q = qs[i];
    const int32_t nk = nks[i];
    for (const AttnKeys::Run& r : keys.runs) {
      if (r.pos >= nk) break;
      const T* kb = kl + KeyElement(r.block, r.slot0, kvh, 0, kvn, D, bs);
      for (int32_t l = 0; l < r.len && r.pos + l < nk; ++l) {
        float s = 0.0f;
        for (int32_t d = 0; d < D; ++d) {
          s = std::fma(q[d], ToF32(kb[static_cast<size_t>(d) * bs + l]), s);
        }
        sc[r.pos + l] = s * scale;
      }
    }
    float mx = -std::numeric_limits<float>::infinity();
    for (int32_t k = 0; k < nk; ++k) mx = std::max(mx, sc[k]);
    float sum = 0.0f;
    for (int32_t k = 0; k < nk; ++k) {
      sc[k] = std::exp(sc[k] - mx);
      sum += sc[k];
    }
    std::fill(acc, acc + D, 0.0f);
    for (int32_t k = 0; k < nk; ++k) {
      const T* vv = vl + (keys.slots[k] * kvn + kvh) * D;
      for (int32_t d = 0; d < D; ++d) acc[d] = std::fma(sc[k], ToF32(vv[d]), acc[d]);
    }
    const float inv = 1.0f / sum;
    for (int32_t d = 0; d < D; ++d) outs[i][d] = acc[d] * inv;
  }
}

// ---------------------------------------------------------------------------------
// AVX-512 kernel. Scores: QB queries x RB runs of 16 keys per tile, one fma chain over d
// per lane. Values: QB queries x NV vectors of the output per tile, keys in order.

#define SP_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

// GCC 12's intrinsics (_mm512_reduce_add_ps, the masked conversions) start from an
// "undefined" vector and warn about it.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

// 16 (masked) K or V elements as floats.
SP_AVX512 inline __m512 Load16(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
SP_AVX512 inline __m512 Load16(__mmask16 m, const uint16_t* p) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <typename T, int QB, int RB>
SP_AVX512 void ScoreTile(const float* const* q, const T* const* kb, const __mmask16* m,
                         const int32_t* pos, int32_t D, int32_t bs, float scale,
                         float* const* rows) {
  __m512 acc[QB][RB];
  for (int j = 0; j < QB; ++j) {
    for (int r = 0; r < RB; ++r) acc[j][r] = _mm512_setzero_ps();
  }
  for (int32_t d = 0; d < D; ++d) {
    __m512 kd[RB];
    for (int r = 0; r < RB; ++r) kd[r] = Load16(m[r], kb[r] + d * bs);
    for (int j = 0; j < QB; ++j) {
      const __m512 b = _mm512_set1_ps(q[j][d]);
      for (int r = 0; r < RB; ++r) acc[j][r] = _mm512_fmadd_ps(b, kd[r], acc[j][r]);
    }
  }
  const __m512 s = _mm512_set1_ps(scale);
  for (int j = 0; j < QB; ++j) {
    for (int r = 0; r < RB; ++r) {
      _mm512_mask_storeu_ps(rows[j] + pos[r], m[r], _mm512_mul_ps(acc[j][r], s));
    }
  }
}

// Scores of queries [0, QB) (rows of `scores`, stride `stride`) against every run one
// of them can see.
template <typename T, int QB, int RB>
SP_AVX512 void ScoreQueries(const KvLayerView& kv, int32_t kvh, const AttnKeys& keys,
                            const float* const* q, int32_t nk_hi, float scale, float* const* rows) {
  const int32_t D = kv.head_dim, bs = kv.block_size;
  const int32_t nr = static_cast<int32_t>(keys.runs.size());
  for (int32_t r0 = 0; r0 < nr && keys.runs[r0].pos < nk_hi; r0 += RB) {
    const T* kb[RB];
    __mmask16 m[RB];
    int32_t pos[RB];
    for (int r = 0; r < RB; ++r) {
      const int32_t ri = r0 + r;
      if (ri < nr && keys.runs[ri].pos < nk_hi) {
        const AttnKeys::Run& run = keys.runs[ri];
        kb[r] = static_cast<const T*>(kv.k) +
                KeyElement(run.block, run.slot0, kvh, 0, kv.kv_heads, D, bs);
        m[r] = static_cast<__mmask16>((1u << run.len) - 1);
        pos[r] = run.pos;
      } else {  // padding: nothing loaded or stored
        kb[r] = static_cast<const T*>(kv.k);
        m[r] = 0;
        pos[r] = 0;
      }
    }
    ScoreTile<T, QB, RB>(q, kb, m, pos, D, bs, scale, rows);
  }
}

// Queries per value tile: 6 x 4 accumulators + 4 value vectors + 1 broadcast = 29 of
// the 32 zmm registers.
constexpr int kValueQueries = 6;

template <typename T, int NV>
SP_AVX512 void ValueTile(const KvLayerView& kv, int32_t kvh, const AttnKeys& keys,
                         const int32_t* nk, const float* const* p, const float* inv, int32_t d0,
                         __mmask16 last, float* const* outs) {
  const int32_t D = kv.head_dim, kvn = kv.kv_heads;
  const int32_t nk_hi = *std::max_element(nk, nk + kValueQueries);
  constexpr int QB = kValueQueries;
  __m512 acc[QB][NV];
  for (int j = 0; j < QB; ++j) {
    for (int v = 0; v < NV; ++v) acc[j][v] = _mm512_setzero_ps();
  }
  for (int32_t k = 0; k < nk_hi; ++k) {
    const T* vv = static_cast<const T*>(kv.v) + (keys.slots[k] * kvn + kvh) * D + d0;
    __m512 x[NV];
    for (int v = 0; v < NV; ++v) {
      x[v] = Load16(v == NV - 1 ? last : static_cast<__mmask16>(0xffff), vv + 16 * v);
    }
    for (int j = 0; j < QB; ++j) {
      if (k >= nk[j]) continue;
      const __m512 b = _mm512_set1_ps(p[j][k]);
      for (int v = 0; v < NV; ++v) acc[j][v] = _mm512_fmadd_ps(b, x[v], acc[j][v]);
    }
  }
  for (int j = 0; j < QB; ++j) {
    if (nk[j] == 0) continue;  // padding
    const __m512 s = _mm512_set1_ps(inv[j]);
    for (int v = 0; v < NV; ++v) {
      _mm512_mask_storeu_ps(outs[j] + d0 + 16 * v,
                            v == NV - 1 ? last : static_cast<__mmask16>(0xffff),
                            _mm512_mul_ps(acc[j][v], s));
    }
  }
}

// Softmax of one score row in place (keys [0, nk)); returns the sum of the exponentials.
SP_AVX512 float SoftmaxRow(float* sc, int32_t nk) {
  // The maximum is exact in any order.
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 vmx = ninf;
  for (int32_t k = 0; k < nk; k += 16) {
    const __mmask16 lanes = nk - k >= 16 ? static_cast<__mmask16>(0xffff)
                                         : static_cast<__mmask16>((1u << (nk - k)) - 1);
    vmx = _mm512_max_ps(vmx, _mm512_mask_loadu_ps(ninf, lanes, sc + k));
  }
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vmx));
  __m512 total = _mm512_setzero_ps();
  for (int32_t k = 0; k < nk; k += 16) {
    const __mmask16 lanes = nk - k >= 16 ? static_cast<__mmask16>(0xffff)
                                         : static_cast<__mmask16>((1u << (nk - k)) - 1);
    const __m512 e = _ZGVeN16v_expf(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, sc + k), m));
    _mm512_mask_storeu_ps(sc + k, lanes, e);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(lanes, e));
  }
  return _mm512_reduce_add_ps(total);
}

template <typename T>
SP_AVX512 void AttendAvx512(const KvLayerView& kv, int32_t kvh, const AttnKeys& keys, int32_t n,
                            const float* const* qs, const int32_t* nks, float scale,
                            float* const* outs, AttnScratch* scratch) {
  const int32_t D = kv.head_dim;
  const size_t stride = ScoreStride(MaxOf(nks, n));
  scratch->scores.resize(stride * n);
  float* scores = scratch->scores.data();
  // Scores, 4 queries at a time (1 query: 8 runs at a time, for independent chains).
  for (int32_t j0 = 0; j0 < n; j0 += 4) {
    const int32_t qb = std::min(4, n - j0);
    const int32_t nk_hi = MaxOf(nks + j0, qb);
    float* rows[4];
    for (int j = 0; j < qb; ++j) rows[j] = scores + (j0 + j) * stride;
    switch (qb) {
      case 1:
        ScoreQueries<T, 1, 8>(kv, kvh, keys, qs + j0, nk_hi, scale, rows);
        break;
      case 2:
        ScoreQueries<T, 2, 4>(kv, kvh, keys, qs + j0, nk_hi, scale, rows);
        break;
      case 3:
        ScoreQueries<T, 3, 4>(kv, kvh, keys, qs + j0, nk_hi, scale, rows);
        break;
      default:
        ScoreQueries<T, 4, 4>(kv, kvh, keys, qs + j0, nk_hi, scale, rows);
        break;
    }
  }
  std::vector<float>& inv = scratch->inv;
  inv.resize(n);
  for (int32_t i = 0; i < n; ++i) inv[i] = 1.0f / SoftmaxRow(scores + i * stride, nks[i]);
  // Values, kValueQueries queries x up to 64 output floats at a time.
  constexpr int VQ = kValueQueries;
  for (int32_t j0 = 0; j0 < n; j0 += VQ) {
    int32_t nk[VQ] = {};
    const float* p[VQ];
    float iv[VQ] = {};
    float* o[VQ];
    for (int j = 0; j < VQ; ++j) {
      const int32_t i = std::min(j0 + j, n - 1);
      if (j0 + j < n) {
        nk[j] = nks[i];
        iv[j] = inv[i];
      }
      p[j] = scores + i * stride;
      o[j] = outs[i];
    }
    for (int32_t d0 = 0; d0 < D; d0 += 64) {
      const int32_t w = std::min(64, D - d0);
      const int32_t nv = (w + 15) / 16;
      const int32_t tail = w - 16 * (nv - 1);
      const __mmask16 last = static_cast<__mmask16>((1u << tail) - 1);
      switch (nv) {
        case 1:
          ValueTile<T, 1>(kv, kvh, keys, nk, p, iv, d0, last, o);
          break;
        case 2:
          ValueTile<T, 2>(kv, kvh, keys, nk, p, iv, d0, last, o);
          break;
        case 3:
          ValueTile<T, 3>(kv, kvh, keys, nk, p, iv, d0, last, o);
          break;
        default:
          ValueTile<T, 4>(kv, kvh, keys, nk, p, iv, d0, last, o);
          break;
      }
    }
  }
}

#pragma GCC diagnostic pop

}  // namespace

AttnKernel BestAttnKernel() {
  static const AttnKernel k = CpuHasAvx512() ? AttnKernel::kAvx512 : AttnKernel::kPortable;
  return k;
}

const char* AttnKernelName(AttnKernel k) {
  return k == AttnKernel::kAvx512 ? "avx512" : "portable";
}

void AttendWith(AttnKernel kernel, const KvLayerView& kv, int32_t kvh, const AttnKeys& keys,
                int32_t n, const float* const* qs, const int32_t* nks, float scale,
                float* const* outs, AttnScratch* scratch) {
  if (n <= 0) return;
  if (kernel == AttnKernel::kAvx512) {
    (kv.bf16 ? AttendAvx512<uint16_t> : AttendAvx512<float>)(kv, kvh, keys, n, qs, nks, scale, outs,
                                                             scratch);
  } else {
    (kv.bf16 ? AttendPortable<uint16_t> : AttendPortable<float>)(kv, kvh, keys, n, qs, nks, scale,
                                                                 outs, scratch);
  }
}

void Attend(const KvLayerView& kv, int32_t kvh, const AttnKeys& keys, int32_t n,
            const float* const* qs, const int32_t* nks, float scale, float* const* outs,
            AttnScratch* scratch) {
  AttendWith(BestAttnKernel(), kv, kvh, keys, n, qs, nks, scale, outs, scratch);
}

}  // namespace superpose::engine::cpu
