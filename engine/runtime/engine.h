// The engine: one loop thread that owns the waiting and running sequences, the KV block
// manager and the backend. Each iteration it takes a snapshot of the sequences, lets the
// scheduler decide (scheduler.h), applies the decision, builds the step's BatchPlan
// (step_plan.h), runs the backend and hands each row to the emitter (emitter.h) or to
// the sequence's owner (a RAG request's planner, engine/rag/planner.h).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/backend.h"
#include "engine/kv/kv_block_manager.h"
#include "engine/model/config.h"
#include "engine/model/tokenizer.h"
#include "engine/rag/rag.h"
#include "engine/runtime/lazy_steps.h"
#include "engine/runtime/tenant_policy.h"
#include "engine/sequence/request.h"

namespace superpose::engine {

class AdapterManager;  // engine/runtime/adapters.h

struct EngineOptions {
  int32_t max_batch_tokens = 512;  // new tokens per step (decode + prefill chunks)
  int32_t max_running = 64;        // sequences in the running batch
  int32_t max_waiting = 256;       // queued requests beyond which Submit fails
  int32_t max_context = 0;         // 0: the model's max_position_embeddings
  bool prefix_caching = true;
  int32_t rag_max_documents = 64;  // documents per RAG request
  // Ask the backend for compact logits rows (a row's best tokens, see
  // BatchPlan::logits_top) where they sample exactly like the whole row: greedy and
  // top-k requests without penalties. Off: every row whole (same tokens, more bytes).
  bool compact_logits = true;
  // Private mode (--private): nothing outlives a request. The prefix cache and the RAG
  // path cache are off (whatever prefix_caching and a request's rag.path_cache say) and
  // every KV block is zeroed (Backend::ZeroKvBlocks) when its last reference goes,
  // before it can be reused. The backend must implement ZeroKvBlocks; should zeroing
  // fail, Health() fails from then on (new requests: UNAVAILABLE).
  bool private_mode = false;
  // A request still waiting (never admitted) after this long is refused with
  // RESOURCE_EXHAUSTED and a retry hint (RetryAfterMs); 0: no bound.
  int64_t max_queue_ms = 0;
  // LazyLLM token pruning (--lazy_default, --lazy_min_prompt): the schedule of plain
  // requests that do not choose, and the prompt length below which none prunes.
  LazyEngineOptions lazy = {};
};

// Observes the engine for metrics; called on the engine thread.
class EngineObserver {
 public:
  virtual ~EngineObserver() = default;
  virtual void OnFinished(const Usage& usage, FinishReason reason, const absl::Status& status) {}
  virtual void OnFirstToken(double queue_time_ms, double ttft_ms) {}
  virtual void OnToken(double inter_token_ms) {}
  virtual void OnPreempted() {}
  virtual void OnStep(int32_t running, int32_t waiting, int32_t batch_tokens) {}
  // A RAG request finished successfully (before its final event is sent).
  virtual void OnRagFinished(const rag::Result& result) {}
  // Per tenant: a client request finished (after OnFinished), or was refused for having
  // waited longer than max_queue_ms (before its final event).
  virtual void OnTenantFinished(const std::string& tenant, const Usage& usage, FinishReason reason,
                                const absl::Status& status) {}
  virtual void OnQueueTimeout(const std::string& tenant) {}
  // A LazyLLM prefill decided: of `prompt_tokens`, `pruned_tokens` did not reach the
  // last stage.
  virtual void OnLazyPrefill(int64_t prompt_tokens, int64_t pruned_tokens) {}
  // LazyLLM revival: prompt tokens a decode step revived from the Aux Cache.
  virtual void OnLazyRevived(int64_t tokens) {}
};

struct EngineStats {
  int32_t running = 0;
  int32_t waiting = 0;
  int32_t kv_blocks_total = 0;
  int32_t kv_blocks_free = 0;
  int32_t kv_blocks_cached = 0;
  int64_t preemptions = 0;
  int64_t steps = 0;
  int64_t path_cache_hits = 0;
  int64_t path_cache_misses = 0;
};

class Engine {
 public:
  Engine(const EngineOptions& options, const ModelConfig& config, const Tokenizer* tokenizer,
         Backend* backend);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  void SetObserver(EngineObserver* observer);
  // Replaces the per-tenant limits and weights (thread-safe, any time: a reload applies
  // to requests submitted after it and to the scheduling steps after it).
  void SetTenantPolicies(TenantPolicies policies);
  // LoRA adapters that requests may name (Request::adapter_id); before Start. Without,
  // a request naming one is refused. `adapters` must outlive the engine.
  void SetAdapters(AdapterManager* adapters);
  void Start();
  // Queues a request (a RAG request when request.rag is set). INVALID_ARGUMENT naming
  // the field for a bad request, RESOURCE_EXHAUSTED (with a retry hint, RetryAfterMs)
  // when the waiting queue is full or the tenant is at a limit (TenantPolicy),
  // UNAVAILABLE after Shutdown. The priority is capped to the tenant's max_priority. The callback
  // gets every event, the last with finished = true, on the engine thread; it is never called after
  // that.
  absl::StatusOr<uint64_t> Submit(Request request, StreamCallback callback);
  // Cancels a request (client cancel). Its final event carries CANCELLED status.
  void Cancel(uint64_t handle);
  // Stops accepting (Submit: UNAVAILABLE), fails the requests not yet admitted with
  // UNAVAILABLE at once (clients retry elsewhere), lets admitted ones run up to `grace`,
  // then finishes the rest with finish_reason kCancelled and an OK status (their final
  // event carries the usage), and joins the loop thread. Every block is free after it.
  void Shutdown(absl::Duration grace);

  EngineStats stats() const;
  // The backend's health (Backend::Health), or FAILED_PRECONDITION once private mode
  // could not zero a freed block; while it is not OK, Submit answers UNAVAILABLE and the
  // server reports NOT_SERVING.
  absl::Status Health() const;
  int32_t context_length() const;
  const KvBlockManager& blocks() const;

 private:
  class Impl;  // engine.cc
  std::unique_ptr<Impl> impl_;
};

}  // namespace superpose::engine
