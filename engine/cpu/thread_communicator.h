// Collectives among threads of one process: the CPU stand-in for NCCL, so that
// tensor parallelism runs (and is tested) on any machine.
#pragma once

#include <memory>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "engine/backend.h"

namespace superpose::engine::cpu {

// Shared state of one group of `size` ranks; create one Communicator per rank with
// Rank(i). Every rank must call the same collectives in the same order.
class ThreadGroup {
 public:
  explicit ThreadGroup(int32_t size);
  std::unique_ptr<Communicator> Rank(int32_t rank);

 private:
  friend class ThreadCommunicator;
  // false when the group was aborted (then it never waits).
  bool Barrier();
  void Abort();

  const int32_t size_;
  absl::Mutex mu_;
  absl::CondVar cv_;
  int32_t arrived_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  bool aborted_ ABSL_GUARDED_BY(mu_) = false;
  // Published by each rank between barriers.
  std::vector<float*> ptrs_;
  std::vector<const float*> cptrs_;
  std::vector<float> scratch_;
};

class ThreadCommunicator : public Communicator {
 public:
  ThreadCommunicator(ThreadGroup* group, int32_t rank) : group_(group), rank_(rank) {}
  int32_t rank() const override { return rank_; }
  int32_t size() const override { return group_->size_; }
  absl::Status AllReduceSum(float* data, int64_t count) override;
  absl::Status AllGather(const float* in, int64_t count, float* out) override;
  absl::Status Broadcast(float* data, int64_t count, int32_t root) override;
  absl::Status Barrier() override;
  void Abort() override;

 private:
  ThreadGroup* group_;
  int32_t rank_;
};

}  // namespace superpose::engine::cpu
