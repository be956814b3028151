#include "engine/runtime/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "engine/row_sampling.h"
#include "engine/row_math.h"

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

int32_t Sampler::SampleAll(absl::Span<const float> logits) {
  const float* x = logits.data();
  const int32_t V = static_cast<int32_t>(logits.size());
  const float inv_t = 1.0f / options_.temperature;
  const float mx_raw = MaxOf(x, V);
  const float mx = mx_raw * inv_t;
  const int64_t draw = NextDraw();
  const uint64_t key = RaceKey(options_.seed, draw);
  RaceFilter filter;
  filter.min_p = options_.min_p;
  if (options_.top_p < 1.0f) {
    // The shortest prefix in rank order (RankKey descending, ids ascending) whose mass
    // reaches the target: a radix select over the keys of the tokens of positive mass,
    // 8 bits at a time, finds the key K of its last token; among the tokens with key K
    // the first ones in id order complete the mass, up to cut_last. Integer masses:
    // exact in any order.
    WeighRow(x, V, inv_t, mx, options_.min_p, &kept_);
    const uint64_t target = TopPTarget(options_.top_p, kept_.total);
    int32_t n = kept_.count;
    int32_t* ids = kept_.ids.data();
    uint32_t* keys = kept_.keys.data();
    float* mass = kept_.mass.data();
    uint64_t above = 0;  // mass of the tokens with a key above the bucket in play
    uint32_t K = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
      uint64_t hist[4][256] = {};  // four copies: no chain of adds to one counter
      int32_t j = 0;
      for (; j + 4 <= n; j += 4) {
        for (int c = 0; c < 4; ++c) {
          hist[c][(keys[j + c] >> shift) & 0xFF] += static_cast<uint64_t>(mass[j + c]);
        }
      }
      for (; j < n; ++j) hist[0][(keys[j] >> shift) & 0xFF] += static_cast<uint64_t>(mass[j]);
      int b = 255;
      auto at = [&](int k) { return hist[0][k] + hist[1][k] + hist[2][k] + hist[3][k]; };
      while (b > 0 && above + at(b) < target) above += at(b--);
      K |= static_cast<uint32_t>(b) << shift;
      mask |= 0xFFu << shift;
      int32_t m = 0;
      for (j = 0; j < n; ++j) {
        if ((keys[j] & mask) != K) continue;
        ids[m] = ids[j];
        keys[m] = keys[j];
        mass[m] = mass[j];
        ++m;
      }
      n = m;
    }
    int32_t last_equal = -1;
    uint64_t cum = above;
    for (int32_t j = 0; j < n; ++j) {  // ascending ids, key K
      cum += static_cast<uint64_t>(mass[j]);
      last_equal = ids[j];
      if (cum >= target) break;
    }
    filter.cut_key = K;
    filter.cut_last = last_equal;
  }
  // A lower bound of the winning score: the score of the best token (the first with the
  // largest logit: kept, by min-p when min_p <= 1, by top-p always). A token with z
  // below it minus 18.5 (the noise is below 16.7) cannot win and is not scored.
  const int32_t top = FirstIndexOf(x, V, mx_raw);
  if (top < V && options_.min_p <= 1.0f) {
    const float best = ScaledLogit(x[top], inv_t, mx) + RaceNoiseAt(key, top);
    if (std::isfinite(best)) filter.z_floor = best - 18.5f;
  }
  const int32_t t = RaceRow(x, V, inv_t, mx, key, filter);
  if (t >= 0) return t;
  // Nothing scored above -infinity (no finite row): the reference's token.
  const RowSampling rs{options_.temperature, options_.top_p, options_.min_p, options_.seed, draw};
  return SampleRowReference(x, V, rs);
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
