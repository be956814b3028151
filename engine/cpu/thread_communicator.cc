#include "engine/cpu/thread_communicator.h"

#include <algorithm>
#include <cstring>

namespace superpose::engine::cpu {

ThreadGroup::ThreadGroup(int32_t size) : size_(size), ptrs_(size, nullptr), cptrs_(size, nullptr) {}

std::unique_ptr<Communicator> ThreadGroup::Rank(int32_t rank) {
  return std::make_unique<ThreadCommunicator>(this, rank);
}

bool ThreadGroup::Barrier() {
  absl::MutexLock lock(&mu_);
  if (aborted_) return false;
  const int64_t gen = generation_;
  if (++arrived_ == size_) {
    arrived_ = 0;
    ++generation_;
    cv_.SignalAll();
    return true;
  }
  while (generation_ == gen && !aborted_) cv_.Wait(&mu_);
  return generation_ != gen;
}

void ThreadGroup::Abort() {
  absl::MutexLock lock(&mu_);
  aborted_ = true;
  cv_.SignalAll();
}

namespace {
absl::Status Aborted() {
  return absl::AbortedError("tensor-parallel group aborted: another rank's step failed");
}
}  // namespace

#define SP_BARRIER_OR_ABORTED(g)          \
  do {                                    \
    if (!(g).Barrier()) return Aborted(); \
  } while (0)

absl::Status ThreadCommunicator::AllReduceSum(float* data, int64_t count) {
  ThreadGroup& g = *group_;
  const int32_t n = g.size_;
  if (rank_ == 0 && static_cast<int64_t>(g.scratch_.size()) < count) g.scratch_.resize(count);
  g.ptrs_[rank_] = data;
  SP_BARRIER_OR_ABORTED(g);
  // Each rank reduces one slice of the buffer into the scratch.
  const int64_t chunk = (count + n - 1) / n;
  const int64_t b = std::min(count, rank_ * chunk), e = std::min(count, b + chunk);
  float* out = g.scratch_.data();
  for (int64_t i = b; i < e; ++i) out[i] = g.ptrs_[0][i];
  for (int32_t r = 1; r < n; ++r) {
    const float* src = g.ptrs_[r];
    for (int64_t i = b; i < e; ++i) out[i] += src[i];
  }
  SP_BARRIER_OR_ABORTED(g);
  std::memcpy(data, out, sizeof(float) * count);
  SP_BARRIER_OR_ABORTED(g);  // nobody reuses scratch or pointers before everyone has copied
  return absl::OkStatus();
}

absl::Status ThreadCommunicator::AllGather(const float* in, int64_t count, float* out) {
  ThreadGroup& g = *group_;
  g.cptrs_[rank_] = in;
  SP_BARRIER_OR_ABORTED(g);
  for (int32_t r = 0; r < g.size_; ++r) {
    std::memcpy(out + r * count, g.cptrs_[r], sizeof(float) * count);
  }
  SP_BARRIER_OR_ABORTED(g);
  return absl::OkStatus();
}

absl::Status ThreadCommunicator::Broadcast(float* data, int64_t count, int32_t root) {
  ThreadGroup& g = *group_;
  g.ptrs_[rank_] = data;
  SP_BARRIER_OR_ABORTED(g);
  if (rank_ != root) std::memcpy(data, g.ptrs_[root], sizeof(float) * count);
  SP_BARRIER_OR_ABORTED(g);
  return absl::OkStatus();
}

absl::Status ThreadCommunicator::Barrier() {
  SP_BARRIER_OR_ABORTED(*group_);
  return absl::OkStatus();
}

void ThreadCommunicator::Abort() { group_->Abort(); }

}  // namespace superpose::engine::cpu
