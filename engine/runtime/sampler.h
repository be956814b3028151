// Turns logits into the next token: penalties, temperature, top-k, top-p, min-p, and a
// seeded draw, so that a given seed always yields the same tokens.
//
// Tokens are ranked by logit (lower id first on ties). Greedy takes the first. With a
// temperature the draw is the exponential race of engine/row_sampling.h, keyed by the
// seed and the draw index (the tokens accepted so far): the very draw a backend that
// samples rows makes (SampleRowReference, the CUDA kernel), so a request gets the same
// tokens whichever side draws them. With top_k, the race runs over the top_k best of the
// ranking (as over a row with every other token at -infinity); min-p and top-p cut as
// there (fixed-point masses, exact).
#pragma once

#include <cstdint>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/types/span.h"
#include "engine/backend.h"
#include "engine/row_math.h"
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
  // The same token as Sample() on the whole row, from the row's TopLogitsNeeded() best
  // tokens in rank order.
  int32_t SampleTop(absl::Span<const TopLogit> top);
  // Records a generated token (for the penalties). The race's draw index is the number
  // of tokens accepted so far (what the engine passes a row-sampling backend), plus
  // the draws made since the last Accept (a caller that never accepts still gets
  // fresh draws).
  void Accept(int32_t token);

 private:
  // The race over the kept tokens `sorted`, in rank order (top_k applied).
  int32_t SampleRanked(absl::Span<const TopLogit> sorted);
  // The race over the whole row (no top_k).
  int32_t SampleAll(absl::Span<const float> logits);

  SamplingOptions options_;
  // The race's draw index: accepted_ + pending_.
  int64_t NextDraw() { return accepted_ + pending_++; }
  int64_t accepted_ = 0;  // tokens accepted so far
  int64_t pending_ = 0;   // draws since the last Accept
  absl::flat_hash_map<int32_t, int32_t> output_counts_;
  std::vector<int32_t> seen_;  // distinct tokens of prompt and output
  absl::flat_hash_set<int32_t> seen_set_;
  std::vector<TopLogit> ranked_;
  std::vector<int32_t> ranked_ids_;
  KeptMasses kept_;  // top-p: the tokens of positive fixed-point mass
};

// log-softmax of the raw logits: the chosen token's log-probability and the top `n`.
TokenLogprobs ComputeLogprobs(absl::Span<const float> logits, int32_t chosen, int32_t n);
// The same from a compact row (its best tokens in rank order, at least `n` of them and
// `chosen` among them) and the log-sum-exp of the whole row.
TokenLogprobs LogprobsFromTop(absl::Span<const TopLogit> top, float lse, int32_t chosen, int32_t n);

}  // namespace superpose::engine
