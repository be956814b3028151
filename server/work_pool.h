// A small fixed pool of threads with a bounded queue, for request work that can take a
// while (tokenizing a long prompt), so that it never runs on a gRPC thread and a full
// pool refuses new work instead of queueing without bound.
#pragma once

#include <cstdint>
#include <deque>
#include <thread>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace superpose::server {

class WorkPool {
 public:
  // `threads` >= 1 workers; at most `max_queued` >= 0 tasks wait for a worker.
  WorkPool(int threads, int max_queued);
  // Stop().
  ~WorkPool();
  WorkPool(const WorkPool&) = delete;
  WorkPool& operator=(const WorkPool&) = delete;

  // Queues `task`, or drops it and returns RESOURCE_EXHAUSTED when `max_queued` tasks
  // already wait (UNAVAILABLE once stopping). A task runs exactly once when queued.
  absl::Status TrySubmit(absl::AnyInvocable<void() &&> task);

  // Refuses new tasks, runs every queued one, joins the workers. Idempotent.
  void Stop();

  int threads() const { return static_cast<int>(workers_.size()); }
  int max_queued() const { return max_queued_; }

 private:
  void Loop();
  bool HasWork() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int max_queued_;
  mutable absl::Mutex mu_;
  std::deque<absl::AnyInvocable<void() &&>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  int idle_ ABSL_GUARDED_BY(mu_) = 0;  // workers waiting for a task
  std::vector<std::thread> workers_;
};

}  // namespace superpose::server
