// Turns logits into the next token: penalties, temperature, top-k, top-p, min-p, and a
// per-request seeded generator, so that a given seed always yields the same tokens.
//
// Tokens are ranked by logit (lower id first on ties). With top_k, the kept tokens are
// the top_k best of that ranking, and everything after (softmax, min-p, top-p, the
// draw) walks them in that order. Without top_k, min-p and top-p apply to the whole
// vocabulary (top-p keeps the shortest prefix in rank order whose mass reaches top_p,
// found by a radix select, not a sort) and the draw walks the kept tokens in id order.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/types/span.h"
#include "engine/backend.h"
#include "engine/sequence/request.h"

namespace superpose::engine {

// How many best tokens of a logits row (a compact row, see BatchPlan::logits_top) are
// enough to sample with `options` and report `top_logprobs` alternatives exactly as
// from the whole row: 0 when the whole row is needed (penalties, sampling without
// top_k, or more than kMaxTopLogits tokens, or the whole vocabulary).
int32_t TopLogitsNeeded(const SamplingOptions& options, bool logprobs, int32_t top_logprobs,
                        int32_t vocab);

// Whether a backend that samples rows (Backend::SamplesRows, engine/row_sampling.h)
// can draw this request's tokens: a temperature, no top-k below the vocabulary, no
// penalties (the requests whose whole row the host sampler would need).
bool BackendCanSample(const SamplingOptions& options, int32_t vocab);

class Sampler {
 public:
  Sampler(const SamplingOptions& options, absl::Span<const int32_t> prompt_ids);
  // Picks the next token from `logits` (vocab floats). `logits` is scratch: modified.
  int32_t Sample(absl::Span<float> logits);
  // The same token as Sample() on the whole row (and the same generator state after),
  // from the row's TopLogitsNeeded() best tokens in rank order.
  int32_t SampleTop(absl::Span<const TopLogit> top);
  // Records a generated token (for the penalties).
  void Accept(int32_t token);

 private:
  // Draws from the kept tokens `sorted`, in rank order (top_k applied).
  int32_t SampleRanked(absl::Span<const TopLogit> sorted);
  // Draws from the whole row (no top_k).
  int32_t SampleAll(absl::Span<const float> logits);
  int32_t Draw(absl::Span<const float> probs, absl::Span<const int32_t> ids);

  SamplingOptions options_;
  std::mt19937_64 rng_;
  absl::flat_hash_map<int32_t, int32_t> output_counts_;
  std::vector<int32_t> seen_;  // distinct tokens of prompt and output
  absl::flat_hash_set<int32_t> seen_set_;
  std::vector<TopLogit> ranked_;
  std::vector<float> probs_;
  std::vector<int32_t> ids_;
  std::vector<int32_t> ranked_ids_;
  std::vector<uint32_t> keys_;
};

// log-softmax of the raw logits: the chosen token's log-probability and the top `n`.
TokenLogprobs ComputeLogprobs(absl::Span<const float> logits, int32_t chosen, int32_t n);
// The same from a compact row (its best tokens in rank order, at least `n` of them and
// `chosen` among them) and the log-sum-exp of the whole row.
TokenLogprobs LogprobsFromTop(absl::Span<const TopLogit> top, float lse, int32_t chosen, int32_t n);

}  // namespace superpose::engine
