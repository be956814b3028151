#include "engine/runtime/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>

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
  if (options_.temperature <= 0.0f) {
    return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }
  // Candidates sorted by logit, most likely first (stable: lower id first on ties).
  scratch_.clear();
  scratch_.reserve(V);
  const float inv_t = 1.0f / options_.temperature;
  for (int32_t i = 0; i < V; ++i) scratch_.emplace_back(logits[i] * inv_t, i);
  auto by_logit = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  int32_t keep = V;
  if (options_.top_k > 0 && options_.top_k < V) {
    keep = options_.top_k;
    std::partial_sort(scratch_.begin(), scratch_.begin() + keep, scratch_.end(), by_logit);
  } else {
    std::sort(scratch_.begin(), scratch_.end(), by_logit);
  }
  // Softmax over the kept candidates.
  const float mx = scratch_[0].first;
  double sum = 0.0;
  for (int32_t i = 0; i < keep; ++i) {
    scratch_[i].first = std::exp(scratch_[i].first - mx);
    sum += scratch_[i].first;
  }
  for (int32_t i = 0; i < keep; ++i)
    scratch_[i].first = static_cast<float>(scratch_[i].first / sum);
  if (options_.min_p > 0.0f) {
    const float threshold = options_.min_p * scratch_[0].first;
    int32_t k = 1;
    while (k < keep && scratch_[k].first >= threshold) ++k;
    keep = k;
  }
  if (options_.top_p < 1.0f) {
    double cum = 0.0;
    int32_t k = 0;
    while (k < keep) {
      cum += scratch_[k].first;
      ++k;
      if (cum >= options_.top_p) break;
    }
    keep = k;
  }
  double total = 0.0;
  for (int32_t i = 0; i < keep; ++i) total += scratch_[i].first;
  std::uniform_real_distribution<double> uni(0.0, total);
  const double r = uni(rng_);
  double cum = 0.0;
  for (int32_t i = 0; i < keep; ++i) {
    cum += scratch_[i].first;
    if (r < cum) return scratch_[i].second;
  }
  return scratch_[keep - 1].second;
}

TokenLogprobs ComputeLogprobs(absl::Span<const float> logits, int32_t chosen, int32_t n) {
  const int32_t V = static_cast<int32_t>(logits.size());
  const float mx = *std::max_element(logits.begin(), logits.end());
  double sum = 0.0;
  for (float l : logits) sum += std::exp(static_cast<double>(l - mx));
  const float lse = mx + static_cast<float>(std::log(sum));
  TokenLogprobs out;
  out.chosen = {chosen, logits[chosen] - lse};
  if (n > 0) {
    n = std::min(n, V);
    std::vector<int32_t> idx(V);
    for (int32_t i = 0; i < V; ++i) idx[i] = i;
    std::partial_sort(idx.begin(), idx.begin() + n, idx.end(), [&](int32_t a, int32_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    for (int32_t i = 0; i < n; ++i) out.top.push_back({idx[i], logits[idx[i]] - lse});
  }
  return out;
}

}  // namespace superpose::engine
