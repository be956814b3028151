// The host side of LazyLLM in the CUDA forward (docs/architecture.md "LazyLLM"): the
// rows a step computes in each stage, each stage's metadata (cuda/step_meta.h, built
// from a plan of the rows that remain, so that the kernels see the keys and slots of
// that stage), the score items of the sequences deciding at the stage's end, and the
// decision itself, with exactly the CPU backend's rules (engine::LazyKeepCount,
// engine::LazyTopK). No CUDA includes: tests run it on any machine.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "cuda/lazy_body.h"
#include "cuda/step_meta.h"
#include "engine/backend.h"

namespace superpose::cuda {

// Whether any sequence of the plan prunes (SeqPlan::lazy active).
bool AnyLazy(const engine::BatchPlan& plan);

// UNIMPLEMENTED naming lazy.revive for a plan asking for what this forward does not run:
// decode-time revival (LazyPlan::revive and the entry-mode fields).
absl::Status CheckNoRevival(const engine::BatchPlan& plan);

// The rows a step computes at the current layer: every new token, less those pruned at
// an earlier boundary of their sequence; a sequence's rows stay contiguous and in
// token order.
struct LazyRows {
  std::vector<int32_t> token;                // row -> plan token
  std::vector<engine::KvSlot> slot;          // row -> where its K/V go in its stage
  std::vector<int32_t> begin, count, stage;  // per plan sequence
};
LazyRows AllLazyRows(const engine::BatchPlan& plan);

// Whether sequence `seq`, now in `stage`, leaves it after layer l.
bool LazyAtBoundary(const engine::SeqPlan& seq, int32_t stage, int32_t l);

// The plan the kernels of the current stage run: the rows' tokens, positions (the
// original ones) and slots, each sequence's context that of its stage, logits rows and
// log-prob requests moved to the rows (every one is on a row: ValidateLazyPlan).
engine::BatchPlan StagePlan(const engine::BatchPlan& plan, const LazyRows& rows);

// One stage's metadata: BuildStepMeta of StagePlan (plus the LoRA segments of the rows
// of sequences with `lora_descs`, null for none), then the score items (sorted by
// layer) and the gather rows (`gather`: the previous stage's row of each row).
struct StageMeta {
  StepMeta sm;
  std::vector<LazyScoreItem> items;
  std::vector<int32_t> item_seq, item_layer;  // per item
  size_t off_items = 0, off_gather = 0;
  int32_t score_floats = 0;  // sum of the items' key counts
};
absl::StatusOr<StageMeta> BuildStageMeta(const engine::BatchPlan& plan, const LazyRows& rows,
                                         const std::vector<const void*>& lora_descs,
                                         const std::vector<int32_t>& gather, int32_t block_size,
                                         int32_t max_tile_tokens);

// Upper bounds over every stage of the plan, for reserving before the step: metadata
// words (given the first stage's) and score floats.
size_t LazyMetaWordsBound(const engine::BatchPlan& plan, size_t first_stage_words);
size_t LazyScoreFloatsBound(const engine::BatchPlan& plan);

// The out->lazy entries of the plan's deciding or replaying sequences (every token at
// full depth so far); result_of: per sequence its entry or -1.
void StartLazyOutput(const engine::BatchPlan& plan, std::vector<int32_t>* result_of,
                     engine::ForwardOutput* out);
// layer_tokens[l] of each entry: the rows its sequence computed at layer l.
void CountLazyRows(const LazyRows& rows, int32_t l, const std::vector<int32_t>& result_of,
                   engine::ForwardOutput* out);

// After layer l: every sequence at its boundary goes to its next stage with the rows it
// keeps (scores[si]: the deciding sequence's head-averaged scores of its rows, the last
// row's included; the last row always stays, then the best LazyKeepCount of the others;
// a replay keeps depth > stage + 1; a decode step keeps every row), each taking the
// stage's next slot. Fills `gather` (old row of each new row) and the depths.
void LazyPruneRows(const engine::BatchPlan& plan, int32_t l,
                   const std::vector<std::vector<float>>& scores,
                   const std::vector<int32_t>& result_of, LazyRows* rows,
                   std::vector<int32_t>* gather, engine::ForwardOutput* out);

}  // namespace superpose::cuda
