// LoRA on the CPU backend: y += scale * B (A x) after a base projection, per sequence
// (each row with its sequence's adapter; rows without an adapter untouched). One rank's
// part of an adapter under tensor parallelism (papers.md section 5): the column-parallel
// projections (q, k, v, gate, up) keep A whole and the rows of B that give this rank's
// outputs; the row-parallel ones (o, down) keep the columns of A over this rank's inputs
// and B whole, so their term is a partial sum added before the all-reduce.
//
// Every row is computed by the same instruction sequence whatever the batch, the row's
// place in it and the thread count (16 lane-wise partial sums, a fixed reduction tree),
// so a sequence's results do not depend on the other sequences of its step.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "engine/backend.h"

namespace superpose::engine::cpu {

// Where the CPU layer code applies adapters: after each fused base projection.
enum class LoraSite : int32_t { kQkv, kO, kGateUp, kDown };
inline constexpr int32_t kNumLoraSites = 4;

// One adapted projection on one rank: y[:, offset + j] += scale * (B (A x))_j.
struct LoraProj {
  int32_t rank = 0, in = 0, out = 0, offset = 0;
  float scale = 0.0f;
  std::vector<float> a;   // [rank, in]
  std::vector<float> bt;  // B transposed: [rank, out]
};

// One adapter as one rank computes it.
struct CpuLora {
  std::vector<std::array<std::vector<LoraProj>, kNumLoraSites>> layers;
  int64_t bytes = 0;
};

// This rank's slice of the model (CpuBackend's per-rank sizes).
struct LoraShard {
  int32_t rank = 0;           // tensor-parallel rank
  int32_t q_heads = 0;        // local query heads
  int32_t kv_heads = 0;       // local kv heads
  int32_t kv_head_begin = 0;  // first global kv head
  int32_t inter = 0;          // local MLP columns
};
// This rank's part of `adapter` (whose shapes LoadPeftAdapter checked against `config`).
std::shared_ptr<const CpuLora> ShardLora(const LoraAdapter& adapter, const ModelConfig& config,
                                         const LoraShard& shard);

// The adapters a backend holds, by id. Thread-safe.
class LoraTable {
 public:
  absl::Status Load(int64_t id, std::shared_ptr<const CpuLora> lora);
  absl::Status Unload(int64_t id);
  // Per plan sequence its adapter (null: none). FAILED_PRECONDITION naming the id when
  // a sequence names one that is not loaded.
  absl::StatusOr<std::vector<std::shared_ptr<const CpuLora>>> Resolve(const BatchPlan& plan) const;
  int64_t bytes() const;

 private:
  mutable absl::Mutex mu_;
  absl::flat_hash_map<int64_t, std::shared_ptr<const CpuLora>> map_ ABSL_GUARDED_BY(mu_);
};

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
