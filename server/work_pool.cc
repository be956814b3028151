#include "server/work_pool.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace superpose::server {

WorkPool::WorkPool(int threads, int max_queued) : max_queued_(std::max(0, max_queued)) {
  threads = std::max(1, threads);
  workers_.reserve(static_cast<size_t>(threads));
  for (int i = 0; i < threads; ++i) workers_.emplace_back([this] { Loop(); });
}

WorkPool::~WorkPool() { Stop(); }

void WorkPool::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  for (std::thread& t : workers_) {
    if (t.joinable()) t.join();
  }
}

absl::Status WorkPool::TrySubmit(absl::AnyInvocable<void() &&> task) {
  absl::MutexLock lock(&mu_);
  // A task waits only when every worker is busy; the bound counts waiting tasks.
  if (stopping_) return absl::UnavailableError("the server is shutting down");
  if (static_cast<int>(queue_.size()) >= max_queued_ + idle_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the tokenizer pool is full (", workers_.size(), " threads busy, ",
                     max_queued_, " requests waiting); retry later"));
  }
  queue_.push_back(std::move(task));
  return absl::OkStatus();
}

bool WorkPool::HasWork() const { return !queue_.empty() || stopping_; }

void WorkPool::Loop() {
  for (;;) {
    absl::AnyInvocable<void() &&> task;
    {
      absl::MutexLock lock(&mu_);
      ++idle_;
      mu_.Await(absl::Condition(this, &WorkPool::HasWork));
      --idle_;
      if (queue_.empty()) return;  // stopping, and nothing left to run
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    std::move(task)();
  }
}

}  // namespace superpose::server
