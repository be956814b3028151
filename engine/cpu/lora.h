// LoRA on the CPU backend: y += scale * B (A x) after a base projection, per sequence
// (each row with its sequence's adapter; rows without an adapter untouched). One rank's
// part of an adapter under tensor parallelism: engine/lora_shard.h (ShardLora).
//
// Every row is computed by the same instruction sequence whatever the batch, the row's
// place in it and the thread count (16 lane-wise partial sums, a fixed reduction tree),
// so a sequence's results do not depend on the other sequences of its step.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/lora_shard.h"

namespace superpose::engine::cpu {

using engine::kNumLoraSites;
using engine::LoraProj;
using engine::LoraShard;
using engine::LoraSite;
using engine::ShardLora;
// One adapter as one rank of the CPU backend computes it.
using CpuLora = engine::ShardedLora;

// The adapters the CPU backend holds, by id.
using LoraTable = engine::LoraTable<CpuLora>;

// The adapters of one Forward over its current rows.
class LoraStep {
 public:
  LoraStep() = default;
  explicit LoraStep(std::vector<std::shared_ptr<const CpuLora>> per_seq)
      : per_seq_(std::move(per_seq)) {}
  // The step's rows: sequence s has rows [begin[s], begin[s] + count[s]).
  void SetRows(const std::vector<int32_t>& begin, const std::vector<int32_t>& count);
  // y[row, 0..y_width) += the adapters' terms of `site` at `layer` for x[row, 0..in)
  // (x's width is the projection's input width on this rank).
  void Apply(LoraSite site, int32_t layer, const float* x, float* y, int32_t y_width) const;
  bool empty() const { return rows_.empty(); }

 private:
  std::vector<std::shared_ptr<const CpuLora>> per_seq_;
  std::vector<std::pair<int32_t, const CpuLora*>> rows_;  // rows with an adapter
};

}  // namespace superpose::engine::cpu
