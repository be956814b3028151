// Turns logits into the next token: penalties, temperature, top-k, top-p, min-p, and a
// per-request seeded generator, so that a given seed always yields the same tokens.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/types/span.h"
#include "engine/runtime/request.h"

namespace superpose::engine {

class Sampler {
 public:
  Sampler(const SamplingOptions& options, absl::Span<const int32_t> prompt_ids);
  // Picks the next token from `logits` (vocab floats). `logits` is scratch: modified.
  int32_t Sample(absl::Span<float> logits);
  // Records a generated token (for the penalties).
  void Accept(int32_t token);

 private:
  SamplingOptions options_;
  std::mt19937_64 rng_;
  absl::flat_hash_map<int32_t, int32_t> output_counts_;
  std::vector<int32_t> seen_;  // distinct tokens of prompt and output
  absl::flat_hash_set<int32_t> seen_set_;
  std::vector<std::pair<float, int32_t>> scratch_;
};

// log-softmax of the raw logits: the chosen token's log-probability and the top `n`.
TokenLogprobs ComputeLogprobs(absl::Span<const float> logits, int32_t chosen, int32_t n);

}  // namespace superpose::engine
