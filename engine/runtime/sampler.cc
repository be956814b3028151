#include "engine/runtime/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "engine/runtime/row_math.h"

namespace superpose::engine {

const char* FinishReasonName(FinishReason f) {
  switch (f) {
    case FinishReason::kNone:
      return "none";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kEos:
      return "eos";
    case FinishReason::kCancelled:
      return "cancelled";
  }
  return "unknown";
}

int32_t TopLogitsNeeded(const SamplingOptions& options, bool logprobs, int32_t top_logprobs,
                        int32_t vocab) {
  if (options.repetition_penalty != 1.0f || options.presence_penalty != 0.0f ||
      options.frequency_penalty != 0.0f) {
    return 0;
  }
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

namespace {
// The binary exponent field of a probability in [0, 1]: a token in a higher bucket is
// more likely, hence ranks before, every token of a lower one.
inline int32_t Bucket(float p) {
  uint32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  return static_cast<int32_t>((bits >> 23) & 0xFF);
}
}  // namespace

int32_t Sampler::SampleAll(absl::Span<const float> logits) {
  const int32_t V = static_cast<int32_t>(logits.size());
  const float inv_t = 1.0f / options_.temperature;
  const float mx = MaxOf(logits.data(), V) * inv_t;
  probs_.resize(V);
  const double sum = ScaledExp(logits.data(), V, inv_t, mx, probs_.data());
  const float inv_sum = static_cast<float>(1.0 / sum);
  for (int32_t i = 0; i < V; ++i) probs_[i] *= inv_sum;
  if (options_.min_p <= 0.0f && options_.top_p >= 1.0f) return Draw(probs_, {});
  // The candidates: every token, or those at least min_p times as likely as the best.
  const float min_prob = options_.min_p > 0.0f ? options_.min_p * inv_sum : 0.0f;
  if (options_.top_p >= 1.0f) {
    ids_.clear();
    for (int32_t i = 0; i < V; ++i) {
      if (probs_[i] >= min_prob) ids_.push_back(i);
    }
    const int32_t n = static_cast<int32_t>(ids_.size());
    std::vector<float>& kept = probs_;  // compacted in place: ids_ ascend
    for (int32_t j = 0; j < n; ++j) kept[j] = kept[ids_[j]];
    return Draw(absl::MakeConstSpan(kept).first(n), ids_);
  }
  // top-p: the shortest prefix in rank order whose mass reaches top_p. Only the tokens
  // of the probability buckets that prefix can reach are ranked: the mass of each
  // bucket says down to which one (and if rounding leaves the prefix just short, all).
  double mass[256] = {};
  for (int32_t i = 0; i < V; ++i) {
    if (probs_[i] >= min_prob) mass[Bucket(probs_[i])] += probs_[i];
  }
  int32_t lowest = 255;
  for (double cum = 0.0; lowest > 0; --lowest) {
    cum += mass[lowest];
    if (cum >= options_.top_p) break;
  }
  auto better = [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  for (;; lowest = 0) {
    ids_.clear();
    for (int32_t i = 0; i < V; ++i) {
      if (probs_[i] >= min_prob && Bucket(probs_[i]) >= lowest) ids_.push_back(i);
    }
    std::sort(ids_.begin(), ids_.end(), better);
    double cum = 0.0;
    int32_t keep = 0;
    const int32_t n = static_cast<int32_t>(ids_.size());
    while (keep < n) {
      cum += probs_[ids_[keep]];
      ++keep;
      if (cum >= options_.top_p) break;
    }
    if (cum >= options_.top_p || lowest == 0) {
      std::vector<float> kept(keep);
      for (int32_t j = 0; j < keep; ++j) kept[j] = probs_[ids_[j]];
      return Draw(kept, absl::MakeConstSpan(ids_).first(keep));
    }
  }
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
