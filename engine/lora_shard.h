// One tensor-parallel rank's part of a LoRA adapter (papers.md section 5), shared by the
// backends that apply adapters (engine/cpu/lora.h, cuda/cuda_lora.h): the
// column-parallel projections (q, k, v, gate, up) keep A whole and the rows of B that
// give this rank's outputs; the row-parallel ones (o, down) keep the columns of A over
// this rank's inputs and B whole, so their term is a partial sum added before the
// all-reduce. Grouped by where a backend applies them: after each fused projection.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "engine/backend.h"
#include "engine/lora_adapter.h"
#include "engine/model/config.h"

namespace superpose::engine {

// Where adapters are applied: after each fused base projection.
enum class LoraSite : int32_t { kQkv, kO, kGateUp, kDown };
inline constexpr int32_t kNumLoraSites = 4;
// The most adapted modules one site fuses (q, k, v).
inline constexpr int32_t kMaxLoraSiteProjs = 3;

// One adapted projection on one rank: y[:, offset + j] += scale * (B (A x))_j.
struct LoraProj {
  int32_t rank = 0, in = 0, out = 0, offset = 0;
  float scale = 0.0f;
  std::vector<float> a;   // [rank, in]
  std::vector<float> bt;  // B transposed: [rank, out]
};

// One adapter as one rank computes it: per layer and site, its projections in module
// order (at most kMaxLoraSiteProjs).
struct ShardedLora {
  std::vector<std::array<std::vector<LoraProj>, kNumLoraSites>> layers;
  int64_t bytes = 0;  // of A and B in float32
};

// This rank's slice of the model (the backends' Megatron split).
struct LoraShard {
  int32_t rank = 0;           // tensor-parallel rank
  int32_t q_heads = 0;        // local query heads
  int32_t kv_heads = 0;       // local kv heads
  int32_t kv_head_begin = 0;  // first global kv head
  int32_t inter = 0;          // local MLP columns
};

// This rank's part of `adapter` (whose shapes LoadPeftAdapter checked against `config`).
std::shared_ptr<const ShardedLora> ShardLora(const LoraAdapter& adapter, const ModelConfig& config,
                                             const LoraShard& shard);

// The adapters a backend holds, by id, as it computes them (T: ShardedLora on the CPU,
// cuda::CudaLora on a GPU; T::bytes is what they hold). Thread-safe: a Forward holds
// the shared_ptrs Resolve gave it, so an Unload while it runs frees nothing under it.
template <class T>
class LoraTable {
 public:
  absl::Status Load(int64_t id, std::shared_ptr<const T> lora) {
    if (id <= 0) return absl::InvalidArgumentError("adapter id must be > 0");
    absl::MutexLock lock(&mu_);
    if (!map_.emplace(id, std::move(lora)).second) {
      return absl::AlreadyExistsError(absl::StrCat("adapter ", id, " is already loaded"));
    }
    return absl::OkStatus();
  }
  absl::Status Unload(int64_t id) {
    std::shared_ptr<const T> gone;  // released after the lock
    absl::MutexLock lock(&mu_);
    auto it = map_.find(id);
    if (it == map_.end()) return absl::NotFoundError(absl::StrCat("adapter ", id, " not loaded"));
    gone = std::move(it->second);
    map_.erase(it);
    return absl::OkStatus();
  }
  // Per plan sequence its adapter (null: none). FAILED_PRECONDITION naming the id when
  // a sequence names one that is not loaded.
  absl::StatusOr<std::vector<std::shared_ptr<const T>>> Resolve(const BatchPlan& plan) const {
    std::vector<std::shared_ptr<const T>> out(plan.seqs.size());
    bool any = false;
    for (const SeqPlan& s : plan.seqs) any |= s.adapter != 0;
    if (!any) return out;
    absl::MutexLock lock(&mu_);
    for (size_t i = 0; i < plan.seqs.size(); ++i) {
      const int64_t id = plan.seqs[i].adapter;
      if (id == 0) continue;
      auto it = map_.find(id);
      if (it == map_.end()) {
        return absl::FailedPreconditionError(
            absl::StrCat("plan: seq ", plan.seqs[i].id, " names adapter ", id, ", not loaded"));
      }
      out[i] = it->second;
    }
    return out;
  }
  int64_t bytes() const {
    absl::MutexLock lock(&mu_);
    int64_t n = 0;
    for (const auto& [id, lora] : map_) n += lora->bytes;
    return n;
  }

 private:
  mutable absl::Mutex mu_;
  absl::flat_hash_map<int64_t, std::shared_ptr<const T>> map_ ABSL_GUARDED_BY(mu_);
};

}  // namespace superpose::engine
