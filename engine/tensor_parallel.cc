#include "engine/tensor_parallel.h"

namespace superpose::engine {

TensorParallelBackend::TensorParallelBackend(std::vector<std::unique_ptr<Backend>> ranks,
                                             std::vector<std::unique_ptr<Communicator>> comms,
                                             std::shared_ptr<void> group)
    : ranks_(std::move(ranks)), comms_(std::move(comms)), group_(std::move(group)) {
  {
    absl::MutexLock lock(&mu_);
    results_.resize(ranks_.size());
  }
  for (int32_t r = 1; r < static_cast<int32_t>(ranks_.size()); ++r) {
    threads_.emplace_back([this, r] { Worker(r); });
  }
}

TensorParallelBackend::~TensorParallelBackend() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
    cv_.SignalAll();
  }
  for (auto& t : threads_) t.join();
}

void TensorParallelBackend::Worker(int32_t rank) {
  int64_t seen = 0;
  while (true) {
    const std::function<absl::Status(int32_t)>* job;
    {
      absl::MutexLock lock(&mu_);
      while (!stop_ && job_id_ == seen) cv_.Wait(&mu_);
      if (stop_) return;
      seen = job_id_;
      job = job_;
    }
    absl::Status st = (*job)(rank);
    absl::MutexLock lock(&mu_);
    results_[rank] = st;
    if (--pending_ == 0) cv_.SignalAll();
  }
}

absl::Status TensorParallelBackend::RunAll(const std::function<absl::Status(int32_t)>& fn) {
  {
    absl::MutexLock lock(&mu_);
    job_ = &fn;
    pending_ = static_cast<int32_t>(ranks_.size()) - 1;
    ++job_id_;
    cv_.SignalAll();
  }
  absl::Status st0 = fn(0);
  absl::MutexLock lock(&mu_);
  while (pending_ > 0) cv_.Wait(&mu_);
  if (!st0.ok()) return st0;
  for (const absl::Status& st : results_) {
    if (!st.ok()) return st;
  }
  return absl::OkStatus();
}

absl::Status TensorParallelBackend::Load(const ModelConfig& config, const WeightSource& weights,
                                         const Shard&) {
  const int32_t n = size();
  return RunAll([&](int32_t r) { return ranks_[r]->Load(config, weights, Shard{r, n}); });
}

absl::Status TensorParallelBackend::Forward(const BatchPlan& plan, ForwardOutput* out) {
  std::vector<ForwardOutput> outs(ranks_.size() - 1);
  absl::Status st = RunAll([&](int32_t r) {
    return ranks_[r]->Forward(plan, r == 0 ? out : &outs[r - 1]);
  });
  return st;
}

KvPoolInfo TensorParallelBackend::kv() const { return ranks_[0]->kv(); }

}  // namespace superpose::engine
