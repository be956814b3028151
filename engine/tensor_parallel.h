// Runs one Backend per tensor-parallel rank in lockstep, one thread per rank, behind
// the Backend interface: the engine sees a single backend. Rank 0's output is
// returned (every rank computes the same logits after the final all-gather).
#pragma once

#include <memory>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "engine/backend.h"

namespace superpose::engine {

class TensorParallelBackend : public Backend {
 public:
  // `ranks[i]` is constructed with the communicator of rank i of size ranks.size();
  // `comms` keeps them alive. The group's size is the number of ranks.
  TensorParallelBackend(std::vector<std::unique_ptr<Backend>> ranks,
                        std::vector<std::unique_ptr<Communicator>> comms,
                        std::shared_ptr<void> group);
  ~TensorParallelBackend() override;

  std::string name() const override { return ranks_[0]->name(); }
  std::string compute_dtype() const override { return ranks_[0]->compute_dtype(); }
  // `shard` must be Shard{} (the group is the whole model); rank i loads Shard{i, size()}.
  absl::Status Load(const ModelConfig& config, const WeightSource& weights,
                    const Shard& shard) override;
  absl::Status Forward(const BatchPlan& plan, ForwardOutput* out) override;
  KvPoolInfo kv() const override;
  bool SamplesRows() const override { return ranks_[0]->SamplesRows(); }
  bool SupportsLazy() const override { return ranks_[0]->SupportsLazy(); }
  bool SupportsLazyRevival() const override { return ranks_[0]->SupportsLazyRevival(); }
  // Every rank keeps its part of the adapter (on the caller's thread: the ranks' own
  // LoadAdapter is thread-safe); a rank that fails unloads it from the others.
  bool SupportsAdapters() const override { return ranks_[0]->SupportsAdapters(); }
  // On every rank, each on its own thread (where its Forward runs).
  void ReleaseSequence(SeqId id) override;
  absl::Status LoadAdapter(int64_t id, const LoraAdapter& adapter) override;
  absl::Status UnloadAdapter(int64_t id) override;
  // FAILED_PRECONDITION once the group was aborted (a rank failed), else the first
  // failed Health of a rank.
  absl::Status Health() const override;
  // Every rank zeroes its part of the blocks (on its own thread).
  absl::Status ZeroKvBlocks(absl::Span<const BlockId> blocks) override;
  // The ranks' bytes of the block, rank 0 first.
  absl::StatusOr<std::vector<uint8_t>> KvBlockBytes(BlockId block) const override;
  int32_t size() const { return static_cast<int32_t>(ranks_.size()); }

 private:
  // Runs fn(rank) on every rank's thread (rank 0 on the caller) and joins. A rank that
  // fails aborts the group's communicators at once, so that the others do not wait in
  // a collective for it; the group then stays failed (every later call fails).
  absl::Status RunAll(const std::function<absl::Status(int32_t)>& fn);
  void AbortGroup(const absl::Status& cause);
  void Worker(int32_t rank);

  std::vector<std::unique_ptr<Backend>> ranks_;
  std::vector<std::unique_ptr<Communicator>> comms_;
  std::shared_ptr<void> group_;
  std::vector<std::thread> threads_;
  int32_t vocab_size_ = 0;  // set by Load

  absl::Mutex mu_;
  absl::CondVar cv_;
  const std::function<absl::Status(int32_t)>* job_ ABSL_GUARDED_BY(mu_) = nullptr;
  int64_t job_id_ ABSL_GUARDED_BY(mu_) = 0;
  int32_t pending_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<absl::Status> results_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  mutable absl::Mutex abort_mu_;
  absl::Status aborted_ ABSL_GUARDED_BY(abort_mu_);  // the first failure, once aborted
};

}  // namespace superpose::engine
