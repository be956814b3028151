// Admission of generation calls, for shutdown: counts the calls in flight, refuses new
// ones once closed, and lets the shutdown wait until the last one is done.
#pragma once

#include <cstdint>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace superpose::server {

class CallGate {
 public:
  // A new call: false once Close() was called (the call must be refused), else it
  // counts until Exit().
  bool Enter() {
    absl::MutexLock lock(&mu_);
    if (closed_) return false;
    ++active_;
    return true;
  }
  void Exit() {
    absl::MutexLock lock(&mu_);
    --active_;
  }
  void Close() {
    absl::MutexLock lock(&mu_);
    closed_ = true;
  }
  bool closed() const {
    absl::MutexLock lock(&mu_);
    return closed_;
  }
  // Waits until no call is in flight or `timeout` passes; true when none is.
  bool WaitIdle(absl::Duration timeout) {
    absl::MutexLock lock(&mu_);
    auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return active_ == 0; };
    return mu_.AwaitWithTimeout(absl::Condition(&idle), timeout);
  }
  int32_t active() const {
    absl::MutexLock lock(&mu_);
    return active_;
  }

 private:
  mutable absl::Mutex mu_;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  int32_t active_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace superpose::server
