#include "engine/runtime/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "engine/runtime/row_math.h"

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
    : options_(options), rng_(options.seed) {
  if (options_.repetition_penalty != 1.0f) {
    for (int32_t id : prompt_ids) {
      if (seen_set_.insert(id).second) seen_.push_back(id);
    }
  }
}

void Sampler::Accept(int32_t token) {
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

int32_t Sampler::SampleRanked(absl::Span<const TopLogit> sorted) {
  const int32_t n = static_cast<int32_t>(sorted.size());
  const float inv_t = 1.0f / options_.temperature;
  probs_.resize(n);
  ids_.resize(n);
  for (int32_t i = 0; i < n; ++i) {
    probs_[i] = sorted[i].logit;
    ids_[i] = sorted[i].id;
  }
  const double sum = ScaledExp(probs_.data(), n, inv_t, sorted[0].logit * inv_t, probs_.data());
  for (int32_t i = 0; i < n; ++i) probs_[i] = static_cast<float>(probs_[i] / sum);
  int32_t keep = n;
  if (options_.min_p > 0.0f) {
    const float threshold = options_.min_p * probs_[0];
    int32_t k = 1;
    while (k < keep && probs_[k] >= threshold) ++k;
    keep = k;
  }
  if (options_.top_p < 1.0f) {
    double cum = 0.0;
    int32_t k = 0;
    while (k < keep) {
      cum += probs_[k];
      ++k;
      if (cum >= options_.top_p) break;
    }
    keep = k;
  }
  return Draw(absl::MakeConstSpan(probs_).first(keep), absl::MakeConstSpan(ids_).first(keep));
}

int32_t Sampler::SampleAll(absl::Span<const float> logits) {
  const int32_t V = static_cast<int32_t>(logits.size());
  const float inv_t = 1.0f / options_.temperature;
  const float mx = MaxOf(logits.data(), V) * inv_t;
  probs_.resize(V);
  const double sum = ScaledExp(logits.data(), V, inv_t, mx, probs_.data());
  const float inv_sum = static_cast<float>(1.0 / sum);
  for (int32_t i = 0; i < V; ++i) probs_[i] *= inv_sum;
  if (options_.min_p <= 0.0f && options_.top_p >= 1.0f) return Draw(probs_, {});
  // The candidates: every token, or those at least min_p times as likely as the best
  // (probabilities are >= 0, so a threshold of 0 takes every token).
  const float min_prob = options_.min_p > 0.0f ? options_.min_p * inv_sum : 0.0f;
  if (options_.top_p >= 1.0f) {
    ids_.clear();
    for (int32_t i = 0; i < V; ++i) {
      if (probs_[i] >= min_prob) ids_.push_back(i);
    }
    const int32_t n = static_cast<int32_t>(ids_.size());
    for (int32_t j = 0; j < n; ++j) probs_[j] = probs_[ids_[j]];  // in place: ids_ ascend
    return Draw(absl::MakeConstSpan(probs_).first(n), ids_);
  }
  // top-p keeps the shortest prefix of the candidates in rank order whose mass reaches
  // top_p. A radix select finds it without sorting: 8 bits of the logits' keys at a
  // time, each pass sums the mass of the tokens still in play per bucket and keeps the
  // bucket where the running mass (from the top) reaches top_p; after four passes the
  // tokens left share the key K of the last kept token, and the first of them (by id)
  // complete the mass. Kept: every candidate above K and those first ones.
  double above = 0.0;  // mass of the candidates with a key above the bucket in play
  uint32_t K = 0, mask = 0;
  int32_t last_equal = -1;  // the last kept token with key K; -1: no cut, keep all
  std::vector<int32_t>& in_play = ranked_ids_;
  keys_.resize(V);
  for (int32_t i = 0; i < V; ++i) keys_[i] = RankKey(logits[i]);
  for (int shift = 24; shift >= 0; shift -= 8) {
    // Four interleaved histograms, so that consecutive tokens of one bucket do not wait
    // on each other's adds; summed in a fixed order.
    double mass4[4][256] = {};
    if (shift == 24) {
      for (int32_t i = 0; i < V; ++i) {
        if (probs_[i] >= min_prob) mass4[i & 3][keys_[i] >> 24] += probs_[i];
      }
    } else {
      for (size_t j = 0; j < in_play.size(); ++j) {
        const int32_t i = in_play[j];
        mass4[j & 3][(keys_[i] >> shift) & 0xFF] += probs_[i];
      }
    }
    int b = 255;
    for (; b >= 0; --b) {
      const double m = (mass4[0][b] + mass4[1][b]) + (mass4[2][b] + mass4[3][b]);
      if (above + m >= options_.top_p) break;
      above += m;
    }
    if (b < 0) break;  // rounding left the whole mass just short of top_p: keep all
    K |= static_cast<uint32_t>(b) << shift;
    mask |= 0xFFu << shift;
    if (shift == 24) {
      in_play.clear();
      for (int32_t i = 0; i < V; ++i) {
        if ((keys_[i] >> 24) == static_cast<uint32_t>(b) && probs_[i] >= min_prob) {
          in_play.push_back(i);
        }
      }
    } else {
      size_t n = 0;
      for (int32_t i : in_play) {
        if ((keys_[i] & mask) == K) in_play[n++] = i;
      }
      in_play.resize(n);
    }
    if (shift == 0) {
      double cum = above;
      for (int32_t i : in_play) {  // ascending ids
        cum += probs_[i];
        last_equal = i;
        if (cum >= options_.top_p) break;
      }
    }
  }
  // The draw walks the kept tokens in id order: a kept token's probability, else 0.
  if (last_equal < 0) K = 0;  // no cut: every candidate
  for (int32_t i = 0; i < V; ++i) {
    const bool kept = probs_[i] >= min_prob &&
                      (keys_[i] > K || (keys_[i] == K && (last_equal < 0 || i <= last_equal)));
    probs_[i] = kept ? probs_[i] : 0.0f;
  }
  double total = 0.0;
  int32_t last = 0;
  for (int32_t i = 0; i < V; ++i) {
    total += probs_[i];
    if (probs_[i] > 0.0f) last = i;
  }
  std::uniform_real_distribution<double> uni(0.0, total);
  const double r = uni(rng_);
  double cum = 0.0;
  for (int32_t i = 0; i < V; ++i) {
    cum += probs_[i];
    if (r < cum && probs_[i] > 0.0f) return i;
  }
  return last;
}

int32_t Sampler::Draw(absl::Span<const float> probs, absl::Span<const int32_t> ids) {
  double total = 0.0;
  for (float p : probs) total += p;
  std::uniform_real_distribution<double> uni(0.0, total);
  const double r = uni(rng_);
  double cum = 0.0;
  const int32_t n = static_cast<int32_t>(probs.size());
  int32_t pick = n - 1;
  for (int32_t i = 0; i < n; ++i) {
    cum += probs[i];
    if (r < cum) {
      pick = i;
      break;
    }
  }
  return ids.empty() ? pick : ids[pick];
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
