// Running a CUDA kernel body (cuda/*_body.h) as one block of CPU threads: a barrier for
// __syncthreads, shared by the emulation tests.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

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

// The execution context of one emulated CUDA thread (the kernel bodies' Ctx).
struct BlockCtx {
  int t, n;
  Barrier* barrier;
  int tid() const { return t; }
  int nthreads() const { return n; }
  void sync() const { barrier->Wait(); }
  template <class T, class U>
  void atomic_add(T* p, U v) const {
    __atomic_fetch_add(p, static_cast<T>(v), __ATOMIC_RELAXED);
  }
};

// Runs fn(ctx) on `n` threads, one block: Ctx is BlockCtx or derives from it.
template <class Ctx = BlockCtx, class Fn>
void RunBlock(int n, Fn fn) {
  Barrier barrier(n);
  std::vector<std::thread> threads;
  for (int t = 0; t < n; ++t) {
    threads.emplace_back([&, t] {
      Ctx c{};
      static_cast<BlockCtx&>(c) = BlockCtx{t, n, &barrier};
      fn(c);
    });
  }
  for (auto& th : threads) th.join();
}

}  // namespace superpose::testing
