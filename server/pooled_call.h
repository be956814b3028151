// Runs a call's request work (tokenizing, detokenizing) off the gRPC threads, on the
// bounded WorkPool; the reactor finishes the call when the work is done.
#pragma once

#include <atomic>
#include <cstdint>
#include <utility>

#include <grpcpp/grpcpp.h>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "server/tsan_annotations.h"
#include "server/work_pool.h"

namespace superpose::server {

// Work on at most this many text bytes (about a millisecond of tokenizing) runs inline
// on the gRPC thread: a small request never waits behind large ones in the pool.
inline constexpr int64_t kInlineWorkBytes = 4096;

// A unary reactor owned by gRPC until OnDone and by pooled work while it holds it;
// the last owner deletes it, so work that outlives a cancelled call is safe.
class PooledUnaryCall final : public grpc::ServerUnaryReactor {
 public:
  void Hold() { refs_.fetch_add(1, std::memory_order_relaxed); }
  void Release() {
    if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
  }
  bool cancelled() const { return cancelled_.load(std::memory_order_acquire); }
  void Reject(const grpc::Status& status) { Finish(status); }
  void OnCancel() override {
    cancelled_.store(true, std::memory_order_release);
    SP_HAPPENS_BEFORE(this);  // gRPC runs OnDone after this reaction returns
  }
  void OnDone() override {
    SP_HAPPENS_AFTER(this);
    Release();
  }

 private:
  std::atomic<int> refs_{1};  // gRPC's
  std::atomic<bool> cancelled_{false};
};

// Runs `work` inline when it is small (`bytes` <= kInlineWorkBytes) or there is no
// pool; otherwise queues it, holding `call` until it has run. A full pool finishes the
// call with RESOURCE_EXHAUSTED (a stopping one with UNAVAILABLE). `Call` has Hold(), Release() and
// Reject(grpc::Status).
template <typename Call>
void RunWork(WorkPool* pool, Call* call, int64_t bytes, absl::AnyInvocable<void() &&> work) {
  if (pool == nullptr || bytes <= kInlineWorkBytes) {
    std::move(work)();
    return;
  }
  call->Hold();
  absl::Status st = pool->TrySubmit([call, work = std::move(work)]() mutable {
    std::move(work)();
    call->Release();
  });
  if (!st.ok()) {
    call->Release();
    call->Reject(grpc::Status(static_cast<grpc::StatusCode>(st.code()), std::string(st.message())));
  }
}

}  // namespace superpose::server
