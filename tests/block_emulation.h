// Running a CUDA kernel body (cuda/*_body.h) as one block of CPU threads: a barrier for
// __syncthreads, shared by the emulation tests.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <utility>

namespace superpose::testing {

class Barrier {
 public:
  // `on_complete` runs in the last thread to arrive, before any thread leaves.
  explicit Barrier(int n, std::function<void()> on_complete = nullptr)
      : n_(n), on_complete_(std::move(on_complete)) {}
  void Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const int64_t gen = gen_;
    if (++arrived_ == n_) {
      if (on_complete_) on_complete_();
      arrived_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen_ != gen; });
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  const int n_;
  const std::function<void()> on_complete_;
  int arrived_ = 0;
  int64_t gen_ = 0;
};

}  // namespace superpose::testing
