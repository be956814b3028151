// How many FLOPs (multiply-adds count 2) a model spends on a run of tokens: the cost
// model behind every sequence's FLOP count and the RAG report's comparisons.
#pragma once

#include <cstdint>

#include "engine/model/config.h"

namespace superpose::engine {

// FLOPs of running `n` new tokens of one sequence that already attends to `context`
// keys: the projections and MLP of every layer, attention over context + causal keys,
// and the LM head for `logit_rows` of them.
struct FlopModel {
  double matmul_per_token = 0;   // 2 * projection + MLP parameters, all layers
  double lm_head_per_row = 0;    // 2 * hidden * vocab
  double attention_per_key = 0;  // 4 * layers * heads * head_dim (QK^T and PV)
  explicit FlopModel(const ModelConfig& config);
  double Segment(int64_t context, int64_t n, int64_t logit_rows) const;
};

}  // namespace superpose::engine
