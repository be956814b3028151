#include "engine/tensor_parallel.h"

#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"

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
    if (!st.ok()) AbortGroup(st);
    absl::MutexLock lock(&mu_);
    results_[rank] = st;
    if (--pending_ == 0) cv_.SignalAll();
  }
}

void TensorParallelBackend::AbortGroup(const absl::Status& cause) {
  {
    absl::MutexLock lock(&abort_mu_);
    if (!aborted_.ok()) return;
    aborted_ = cause;
  }
  spdlog::error("tensor-parallel group of {} ranks aborted after a rank failed: {}", ranks_.size(),
                cause.ToString());
  for (auto& c : comms_) c->Abort();
}

absl::Status TensorParallelBackend::Health() const {
  {
    absl::MutexLock lock(&abort_mu_);
    if (!aborted_.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat("tensor-parallel group aborted (a rank failed: ", aborted_.message(), ")"));
    }
  }
  // A rank that cannot run steps any more (a sticky device error) fails the group.
  for (const auto& rank : ranks_) {
    if (absl::Status h = rank->Health(); !h.ok()) return h;
  }
  return absl::OkStatus();
}

absl::Status TensorParallelBackend::RunAll(const std::function<absl::Status(int32_t)>& fn) {
  if (absl::Status h = Health(); !h.ok()) return h;
  {
    absl::MutexLock lock(&mu_);
    job_ = &fn;
    pending_ = static_cast<int32_t>(ranks_.size()) - 1;
    ++job_id_;
    cv_.SignalAll();
  }
  absl::Status st0 = fn(0);
  if (!st0.ok()) AbortGroup(st0);
  absl::MutexLock lock(&mu_);
  while (pending_ > 0) cv_.Wait(&mu_);
  // The first failure, not an ABORTED collective it caused on another rank.
  absl::MutexLock abort_lock(&abort_mu_);
  return aborted_;
}

absl::Status TensorParallelBackend::Load(const ModelConfig& config, const WeightSource& weights,
                                         const Shard& shard) {
  // The group computes the whole model: it hands each rank its shard itself.
  if (!shard.whole()) {
    return absl::InvalidArgumentError(
        absl::StrCat("a tensor-parallel group loads the whole model (Shard{}), not rank ",
                     shard.rank, " of ", shard.size));
  }
  const int32_t n = size();
  if (static_cast<int32_t>(comms_.size()) != n) {
    return absl::InvalidArgumentError(absl::StrCat("tensor-parallel group of ", n, " ranks has ",
                                                   comms_.size(), " communicators"));
  }
  for (int32_t r = 0; r < n; ++r) {
    if (comms_[r]->size() != n || comms_[r]->rank() != r) {
      return absl::InvalidArgumentError(absl::StrCat("communicator ", r, " is rank ",
                                                     comms_[r]->rank(), " of ", comms_[r]->size(),
                                                     ", not rank ", r, " of ", n));
    }
  }
  vocab_size_ = config.vocab_size;
  return RunAll([&](int32_t r) { return ranks_[r]->Load(config, weights, Shard{r, n}); });
}

absl::Status TensorParallelBackend::Forward(const BatchPlan& plan, ForwardOutput* out) {
  // A bad plan fails every rank the same way before any collective: rejected here, so
  // that it does not abort the group.
  if (vocab_size_ > 0) {
    absl::Status valid = ValidatePlan(plan, kv(), vocab_size_);
    if (!valid.ok()) return valid;
  }
  std::vector<ForwardOutput> outs(ranks_.size() - 1);
  absl::Status st =
      RunAll([&](int32_t r) { return ranks_[r]->Forward(plan, r == 0 ? out : &outs[r - 1]); });
  return st;
}

KvPoolInfo TensorParallelBackend::kv() const { return ranks_[0]->kv(); }

void TensorParallelBackend::ReleaseSequence(SeqId id) {
  RunAll([&](int32_t r) {
    ranks_[r]->ReleaseSequence(id);
    return absl::OkStatus();
  }).IgnoreError();  // an aborted group holds nothing more of use
}

absl::Status TensorParallelBackend::LoadAdapter(int64_t id, const LoraAdapter& adapter) {
  for (size_t r = 0; r < ranks_.size(); ++r) {
    absl::Status st = ranks_[r]->LoadAdapter(id, adapter);
    if (st.ok()) continue;
    for (size_t u = 0; u < r; ++u) ranks_[u]->UnloadAdapter(id).IgnoreError();
    return st;
  }
  return absl::OkStatus();
}

absl::Status TensorParallelBackend::UnloadAdapter(int64_t id) {
  absl::Status first;
  for (auto& rank : ranks_) first.Update(rank->UnloadAdapter(id));
  return first;
}

absl::Status TensorParallelBackend::ZeroKvBlocks(absl::Span<const BlockId> blocks) {
  return RunAll([&](int32_t r) { return ranks_[r]->ZeroKvBlocks(blocks); });
}

absl::StatusOr<std::vector<uint8_t>> TensorParallelBackend::KvBlockBytes(BlockId block) const {
  std::vector<uint8_t> all;
  for (const auto& rank : ranks_) {
    absl::StatusOr<std::vector<uint8_t>> b = rank->KvBlockBytes(block);
    if (!b.ok()) return b.status();
    all.insert(all.end(), b->begin(), b->end());
  }
  return all;
}

}  // namespace superpose::engine
