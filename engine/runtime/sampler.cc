#include "engine/runtime/sampler.h"

// GCC 12 flags the placeholder operands inside the AVX-512 cast intrinsics as
// uninitialized in unoptimised (sanitizer) builds; they are never read.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "engine/row_sampling.h"
#include "engine/runtime/row_math.h"

extern "C" __m512 _ZGVeN16v_logf(__m512 x);

namespace superpose::engine {

namespace {
// Penalties change logits by the request's history: only the whole row can take them.
bool HasPenalties(const SamplingOptions& o) {
  return o.repetition_penalty != 1.0f || o.presence_penalty != 0.0f || o.frequency_penalty != 0.0f;
}
}  // namespace

int32_t TopLogitsNeeded(const SamplingOptions& options, bool logprobs, int32_t top_logprobs,
                        int32_t vocab) {
  if (HasPenalties(options)) return 0;
  // The chosen token's log-probability needs it in the row: greedy picks the first,
  // top-k sampling one of the first top_k.
  const int32_t lp = logprobs ? std::max(1, top_logprobs) : 0;
  int32_t n = 0;
  if (options.temperature <= 0.0f) {
    n = std::max(1, lp);
  } else if (options.top_k > 0 && options.top_k < vocab) {
    n = std::max(options.top_k, lp);
  } else {
    return 0;
  }
  return n <= kMaxTopLogits && n < vocab ? n : 0;
}

bool BackendCanSample(const SamplingOptions& options, int32_t vocab) {
  return options.temperature > 0.0f && (options.top_k <= 0 || options.top_k >= vocab) &&
         !HasPenalties(options);
}

Sampler::Sampler(const SamplingOptions& options, absl::Span<const int32_t> prompt_ids)
    : options_(options) {
  if (options_.repetition_penalty != 1.0f) {
    for (int32_t id : prompt_ids) {
      if (seen_set_.insert(id).second) seen_.push_back(id);
    }
  }
}

void Sampler::Accept(int32_t token) {
  ++accepted_;
  pending_ = 0;
  ++output_counts_[token];
  if (options_.repetition_penalty != 1.0f && seen_set_.insert(token).second) {
    seen_.push_back(token);
  }
}

int32_t Sampler::Sample(absl::Span<float> logits) {
  const int32_t V = static_cast<int32_t>(logits.size());
  // Penalties (HF repetition penalty over prompt and output; OpenAI presence and
  // frequency penalties over the output).
  if (options_.repetition_penalty != 1.0f) {
    const float p = options_.repetition_penalty;
    for (int32_t id : seen_) logits[id] = logits[id] > 0 ? logits[id] / p : logits[id] * p;
  }
  if (options_.presence_penalty != 0.0f || options_.frequency_penalty != 0.0f) {
    for (const auto& [id, count] : output_counts_) {
      logits[id] -= options_.presence_penalty + options_.frequency_penalty * count;
    }
  }
  if (options_.temperature <= 0.0f) {  // the best token, lowest id on ties
    const float mx = MaxOf(logits.data(), V);
    return static_cast<int32_t>(std::find(logits.begin(), logits.end(), mx) - logits.begin());
  }
  if (options_.top_k > 0 && options_.top_k < V) {
    ranked_.clear();
    SelectTopLogits(logits, options_.top_k, &ranked_);
    return SampleRanked(ranked_);
  }
  return SampleAll(logits);
}

int32_t Sampler::SampleTop(absl::Span<const TopLogit> top) {
  if (options_.temperature <= 0.0f) return top[0].id;
  return SampleRanked(top.first(std::min<size_t>(top.size(), options_.top_k)));
}

// Scalar arithmetic exactly as SampleRowReference's (ScaledLogit, SpExp, FixedMass,
// RaceNoiseAt): the tokens are few.
int32_t Sampler::SampleRanked(absl::Span<const TopLogit> sorted) {
  const int32_t n = static_cast<int32_t>(sorted.size());
  const float inv_t = 1.0f / options_.temperature;
  const float mx = sorted[0].logit * inv_t;
  ranked_ids_.clear();
  uint64_t total = 0;
  for (int32_t j = 0; j < n; ++j) {
    const float w = SpExp(ScaledLogit(sorted[j].logit, inv_t, mx));
    if (w < options_.min_p) continue;
    ranked_ids_.push_back(j);
    total += FixedMass(w);
  }
  size_t keep = ranked_ids_.size();
  if (options_.top_p < 1.0f) {  // the shortest prefix in rank order that reaches top_p
    const uint64_t target = TopPTarget(options_.top_p, total);
    uint64_t cum = 0;
    keep = 0;
    while (keep < ranked_ids_.size()) {
      cum += FixedMass(SpExp(ScaledLogit(sorted[ranked_ids_[keep]].logit, inv_t, mx)));
      ++keep;
      if (cum >= target) break;
    }
  }
  const uint64_t key = RaceKey(options_.seed, NextDraw());
  int32_t best = -1;
  float best_score = 0.0f;
  for (size_t k = 0; k < keep; ++k) {
    const TopLogit& t = sorted[ranked_ids_[k]];
    const float score = ScaledLogit(t.logit, inv_t, mx) + RaceNoiseAt(key, t.id);
    if (best < 0 || score > best_score || (score == best_score && t.id < best)) {
      best = t.id;
      best_score = score;
    }
  }
  return best;
}

namespace {

// The race over the whole row: argmax of ScaledLogit(x_i) + RaceNoiseAt(key, i) over the
// tokens with keep[i] (every token when keep is null), lower id first on ties, bitwise
// as SampleRowReference computes it.
//
// With AVX-512 a vector pass first scores every token approximately (glibc's vector
// logf, 4 ulp; the products perhaps fused): within `slack` of the exact score. Only the
// tokens within 2 * slack of the best approximate score can win; their exact scores
// (scalar, as the reference) decide. Elsewhere every kept token is scored exactly.
#define SP_RACE_AVX512 __attribute__((target("avx512f,avx512dq")))

SP_RACE_AVX512 inline __m512i Mix64x8(__m512i z) {
  z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)),
                         _mm512_set1_epi64(static_cast<int64_t>(0xBF58476D1CE4E5B9ull)));
  z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)),
                         _mm512_set1_epi64(static_cast<int64_t>(0x94D049BB133111EBull)));
  return _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
}

// Approximate scores into a[0..V) (-inf for tokens not kept); returns the largest, and
// the largest |x| of the kept tokens in *max_abs.
SP_RACE_AVX512 float ApproxScores(const float* x, int32_t V, float inv_t, float mx, uint64_t key,
                                  const uint8_t* keep, float z_floor, float* a, float* max_abs) {
  constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ull;
  const __m512 s = _mm512_set1_ps(inv_t), m = _mm512_set1_ps(mx);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 half = _mm512_set1_ps(0.5f), scale = _mm512_set1_ps(1.0f / 16777216.0f);
  const __m512i step = _mm512_set1_epi64(static_cast<int64_t>(16 * kGamma));
  // (i + 1) * gamma + key for lanes i = 0..7 and 8..15.
  __m512i h_lo = _mm512_set_epi64(8, 7, 6, 5, 4, 3, 2, 1);
  __m512i h_hi = _mm512_set_epi64(16, 15, 14, 13, 12, 11, 10, 9);
  h_lo = _mm512_add_epi64(_mm512_mullo_epi64(h_lo, _mm512_set1_epi64(kGamma)),
                          _mm512_set1_epi64(static_cast<int64_t>(key)));
  h_hi = _mm512_add_epi64(_mm512_mullo_epi64(h_hi, _mm512_set1_epi64(kGamma)),
                          _mm512_set1_epi64(static_cast<int64_t>(key)));
  __m512 best = ninf, big = _mm512_setzero_ps();
  for (int32_t i = 0; i < V; i += 16) {
    __mmask16 live = V - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (V - i)) - 1);
    if (keep != nullptr) {
      alignas(16) uint8_t tail[16] = {};
      const uint8_t* src = keep + i;
      if (V - i < 16) {
        std::memcpy(tail, src, V - i);
        src = tail;
      }
      const __m128i k = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
      live = _mm512_mask_cmpneq_epi32_mask(live, _mm512_cvtepu8_epi32(k), _mm512_setzero_si512());
    }
    const __m512 xv = _mm512_maskz_loadu_ps(live, x + i);
    const __m512 z = _mm512_sub_ps(_mm512_mul_ps(xv, s), m);
    live = _mm512_mask_cmp_ps_mask(live, z, _mm512_set1_ps(z_floor), _CMP_GE_OQ);
    if (live == 0) {  // nothing here can win: no hashes, no logs
      if (V - i >= 16) {
        _mm512_storeu_ps(a + i, ninf);
      } else {
        _mm512_mask_storeu_ps(a + i, __mmask16((1u << (V - i)) - 1), ninf);
      }
      h_lo = _mm512_add_epi64(h_lo, step);
      h_hi = _mm512_add_epi64(h_hi, step);
      continue;
    }
    const __m256 b_lo = _mm512_cvtepi64_ps(_mm512_srli_epi64(Mix64x8(h_lo), 40));
    const __m256 b_hi = _mm512_cvtepi64_ps(_mm512_srli_epi64(Mix64x8(h_hi), 40));
    h_lo = _mm512_add_epi64(h_lo, step);
    h_hi = _mm512_add_epi64(h_hi, step);
    const __m512 bits = _mm512_insertf32x8(_mm512_castps256_ps512(b_lo), b_hi, 1);
    const __m512 u = _mm512_mul_ps(_mm512_add_ps(bits, half), scale);
    const __m512 l = _ZGVeN16v_logf(u);
    const __m512 g = _ZGVeN16v_logf(_mm512_sub_ps(_mm512_setzero_ps(), l));
    const __m512 score = _mm512_mask_blend_ps(live, ninf, _mm512_sub_ps(z, g));
    if (V - i >= 16) {
      _mm512_storeu_ps(a + i, score);
    } else {
      _mm512_mask_storeu_ps(a + i, __mmask16((1u << (V - i)) - 1), score);
    }
    best = _mm512_max_ps(best, score);
    big = _mm512_mask_max_ps(big, live, big, _mm512_abs_ps(xv));
  }
  *max_abs = _mm512_reduce_max_ps(big);
  return _mm512_reduce_max_ps(best);
}

// Ids i (ascending) with a[i] >= thr (never true for NaN).
SP_RACE_AVX512 void AtLeast(const float* a, int32_t V, float thr, std::vector<int32_t>* ids) {
  ids->clear();
  const __m512 t = _mm512_set1_ps(thr);
  int32_t i = 0;
  for (; i + 16 <= V; i += 16) {
    uint32_t m = _mm512_cmp_ps_mask(_mm512_loadu_ps(a + i), t, _CMP_GE_OQ);
    while (m != 0) {
      ids->push_back(i + __builtin_ctz(m));
      m &= m - 1;
    }
  }
  for (; i < V; ++i) {
    if (a[i] >= thr) ids->push_back(i);
  }
}

bool HasAvx512Dq() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
  }();
  return has;
}

int32_t Race(const float* x, int32_t V, float inv_t, float mx, uint64_t key, const uint8_t* keep,
             std::vector<float>* scratch, std::vector<int32_t>* ids) {
  float thr = -std::numeric_limits<float>::infinity();
  const float* approx = nullptr;
  if (HasAvx512Dq()) {
    // A lower bound of the winning score: the exact score of the best token (always
    // kept). A token with z below it minus the largest noise (17.33) minus a margin for
    // the approximate z (< 1 for |max / T| < 1e5) cannot win, and is not scored.
    float z_floor = -std::numeric_limits<float>::infinity();
    const float mx_raw = MaxOf(x, V);
    AtLeast(x, V, mx_raw, ids);  // the first is the lowest id of the best logit
    const int32_t top = ids->empty() ? V : (*ids)[0];
    if (top < V && (keep == nullptr || keep[top] != 0) && std::fabs(mx) < 1e5f) {
      z_floor = ScaledLogit(x[top], inv_t, mx) + RaceNoiseAt(key, top) - 18.5f;
    }
    scratch->resize(V);
    float max_abs = 0.0f;
    const float amax = ApproxScores(x, V, inv_t, mx, key, keep, z_floor, scratch->data(), &max_abs);
    // Error of an approximate score: the vector logs (< 1e-5), the product and the
    // roundings of values below `mag` (a few ulp of it); generously bounded.
    const float mag = max_abs * inv_t + std::fabs(mx) + 20.0f;
    const float slack = 1e-4f + mag * (1.0f / (1 << 20));
    if (std::isfinite(amax)) {
      thr = amax - 2.0f * slack;
      approx = scratch->data();
    }
  }
  int32_t best = -1;
  float best_score = 0.0f;
  auto consider = [&](int32_t i) {
    const float score = ScaledLogit(x[i], inv_t, mx) + RaceNoiseAt(key, i);
    if (best < 0 || score > best_score) {  // ascending ids: the lower id keeps a tie
      best = i;
      best_score = score;
    }
  };
  if (approx != nullptr) {
    AtLeast(approx, V, thr, ids);
    for (int32_t i : *ids) consider(i);
  } else {
    for (int32_t i = 0; i < V; ++i) {
      if (keep == nullptr || keep[i] != 0) consider(i);
    }
  }
  if (best < 0) {  // nothing finite (an all -inf row): the reference's first kept token
    for (int32_t i = 0; i < V; ++i) {
      if (keep == nullptr || keep[i] != 0) return i;
    }
    return 0;
  }
  return best;
}

}  // namespace

int32_t Sampler::SampleAll(absl::Span<const float> logits) {
  const float* x = logits.data();
  const int32_t V = static_cast<int32_t>(logits.size());
  const float inv_t = 1.0f / options_.temperature;
  const float mx = MaxOf(x, V) * inv_t;
  const uint64_t key = RaceKey(options_.seed, NextDraw());
  const float min_p = options_.min_p;
  const bool cut = options_.top_p < 1.0f;
  if (min_p <= 0.0f && !cut) return Race(x, V, inv_t, mx, key, nullptr, &scratch_, &in_play_);

  // Kept by min-p: expf(z) >= min_p. The exact weight is computed only where it decides
  // (z within 2e-3 of log(min_p)) or where top-p needs the mass (z > -24: below,
  // floor(w * 2^32) is 0).
  const float log_min_p = min_p > 0.0f ? std::log(min_p) : -std::numeric_limits<float>::infinity();
  scratch_.resize(V);
  float* za = scratch_.data();
  // z = ScaledLogit(x) exactly, vectorised: the product is rounded in memory before the
  // subtraction (two loops, so the compiler cannot fuse them into one multiply-add).
  for (int32_t i = 0; i < V; ++i) za[i] = x[i] * inv_t;
  for (int32_t i = 0; i < V; ++i) za[i] -= mx;
  keep_.resize(V);
  uint64_t total = 0;
  in_play_.clear();  // with top-p: the kept tokens of positive mass
  if (!cut) {        // min-p only: decided by z, exactly only near the threshold
    uint8_t* keep = keep_.data();
    for (int32_t i = 0; i < V; ++i) keep[i] = za[i] > log_min_p;
    for (int32_t i = 0; i < V; ++i) {
      if (std::fabs(za[i] - log_min_p) < 2e-3f) {
        keep[i] = SpExp(ScaledLogit(x[i], inv_t, mx)) >= min_p;
      }
    }
    return Race(x, V, inv_t, mx, key, keep, &scratch_, &in_play_);
  }
  mass_.resize(V);
  for (int32_t i = 0; i < V; ++i) {
    const bool near = std::fabs(za[i] - log_min_p) < 2e-3f;
    if (!near && !(cut && za[i] > -24.01f)) {
      keep_[i] = min_p <= 0.0f || za[i] > log_min_p;
      continue;
    }
    const float w = SpExp(ScaledLogit(x[i], inv_t, mx));
    const bool kept = w >= min_p;
    keep_[i] = kept;
    if (cut && kept && w > 0.0f) {
      mass_[i] = FixedMass(w);
      if (mass_[i] == 0) continue;
      total += mass_[i];
      in_play_.push_back(i);
    }
  }
  if (cut) {
    // The shortest prefix in rank order (RankKey descending, ids ascending) whose mass
    // reaches the target: a radix select over the keys, 8 bits at a time, finds the key
    // K of its last token; among the tokens with key K the first ones in id order
    // complete the mass, up to last_equal. Integer masses: exact in any order.
    const uint64_t target = TopPTarget(options_.top_p, total);
    uint64_t above = 0;  // mass of the tokens with a key above the bucket in play
    uint32_t K = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
      uint64_t hist[256] = {};
      for (int32_t i : in_play_) hist[(RankKey(x[i]) >> shift) & 0xFF] += mass_[i];
      int b = 255;
      while (b > 0 && above + hist[b] < target) above += hist[b--];
      K |= static_cast<uint32_t>(b) << shift;
      mask |= 0xFFu << shift;
      size_t n = 0;
      for (int32_t i : in_play_) {
        if ((RankKey(x[i]) & mask) == K) in_play_[n++] = i;
      }
      in_play_.resize(n);
    }
    int32_t last_equal = -1;
    uint64_t cum = above;
    for (int32_t i : in_play_) {  // ascending ids, key K
      cum += mass_[i];
      last_equal = i;
      if (cum >= target) break;
    }
    for (int32_t i = 0; i < V; ++i) {
      const uint32_t k = RankKey(x[i]);
      keep_[i] = keep_[i] & static_cast<uint8_t>(k > K || (k == K && i <= last_equal));
    }
  }
  return Race(x, V, inv_t, mx, key, keep_.data(), &scratch_, &in_play_);
}

TokenLogprobs ComputeLogprobs(absl::Span<const float> logits, int32_t chosen, int32_t n) {
  std::vector<TopLogit> top;
  SelectTopLogits(logits, n, &top);
  TokenLogprobs out;
  const float lse = LogSumExp(logits);
  out.chosen = {chosen, logits[chosen] - lse};
  for (const TopLogit& t : top) out.top.push_back({t.id, t.logit - lse});
  return out;
}

TokenLogprobs LogprobsFromTop(absl::Span<const TopLogit> top, float lse, int32_t chosen,
                              int32_t n) {
  TokenLogprobs out;
  out.chosen = {chosen, 0.0f};
  for (const TopLogit& t : top) {
    if (t.id == chosen) {
      out.chosen.logprob = t.logit - lse;
      break;
    }
  }
  for (int32_t i = 0; i < n && i < static_cast<int32_t>(top.size()); ++i) {
    out.top.push_back({top[i].id, top[i].logit - lse});
  }
  return out;
}

}  // namespace superpose::engine
