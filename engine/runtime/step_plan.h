// From the scheduled sequences of a step to the backend's BatchPlan, and the map from
// the plan's rows back to the sequences.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/backend.h"
#include "engine/sequence/sequence.h"

namespace superpose::engine {

// Segments of the first `n` own tokens of `seq` in its blocks (block size `bs`).
void AppendOwnSegments(const Sequence& seq, int32_t n, int32_t bs, std::vector<KvSegment>* out);
// The slot of own token `i` of `seq`.
KvSlot OwnSlot(const Sequence& seq, int32_t i, int32_t bs);

struct StepEntry {
  Sequence* seq = nullptr;
  int32_t num_tokens = 0;
  int32_t token_begin = 0;  // its first token in the plan
  int32_t logits_row = -1;  // its row among plan.logits_for, or -1
  int32_t lp_begin = 0;     // its plan.logprobs entries: [lp_begin, lp_end)
  int32_t lp_end = 0;
  // Its tokens up to and including this step's are all computed.
  bool completes() const {
    return seq->computed + num_tokens == static_cast<int32_t>(seq->tokens.size());
  }
  // Rows of the LM head it pays for (its logits row and its scored tokens).
  int32_t lm_rows() const { return lp_end - lp_begin + (logits_row >= 0 ? 1 : 0); }
};

struct StepPlanOptions {
  int32_t block_size = 16;
  int32_t vocab_size = 0;
  // Compact rows for requests that sample exactly like the whole row (engine option).
  bool compact_logits = true;
  // The backend draws rows itself (Backend::SamplesRows).
  bool backend_samples = false;
};

struct StepPlan {
  BatchPlan plan;
  std::vector<StepEntry> entries;  // in plan order
};

// `scheduled`: (sequence, new tokens) in plan order; every sequence holds the blocks
// its new tokens go to.
StepPlan BuildStepPlan(const std::vector<std::pair<Sequence*, int32_t>>& scheduled,
                       const StepPlanOptions& options);

}  // namespace superpose::engine
