// The engine: one loop thread that owns the scheduler, the KV block manager and the
// backend. Each iteration it builds a BatchPlan from running sequences (one decode
// token each) and waiting ones (prefill chunks) under a token budget, runs the
// backend, samples, checks stop conditions and streams deltas back.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "engine/backend.h"
#include "engine/model/config.h"
#include "engine/model/tokenizer.h"
#include "engine/rag/path_cache.h"
#include "engine/rag/rag.h"
#include "engine/runtime/kv_block_manager.h"
#include "engine/runtime/request.h"

namespace superpose::engine {

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

  void SetObserver(EngineObserver* observer) { observer_ = observer; }
  void Start();
  // Queues a request (a RAG request when request.rag is set). RESOURCE_EXHAUSTED when the waiting
  // queue is full, UNAVAILABLE after Shutdown. The callback gets every event, the last with
  // finished = true, on the engine thread; it is never called after that.
  absl::StatusOr<uint64_t> Submit(Request request, StreamCallback callback);
  // Cancels a request (client cancel). Its final event carries CANCELLED status.
  void Cancel(uint64_t handle);
  // Stops accepting, lets running requests finish up to `grace`, then cancels the
  // rest and joins the loop thread.
  void Shutdown(absl::Duration grace);

  EngineStats stats() const;
  // The backend's health (Backend::Health); while it is not OK, Submit answers
  // UNAVAILABLE and the server reports NOT_SERVING.
  absl::Status Health() const { return backend_->Health(); }
  // Engine-private (engine_internal.h); named here so that helpers can use them.
  struct Sequence;
  struct RagGroup;
  int32_t context_length() const { return max_context_; }
  const KvBlockManager& blocks() const { return *blocks_; }

 private:
  absl::Status ValidateRag(const rag::Spec& spec) const;
  // UNAVAILABLE when shutting down, RESOURCE_EXHAUSTED when the queue is full.
  absl::Status CanQueue() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Loop();
  void Sweep();
  void PublishCounts();
  int32_t Storage(const Sequence& seq, int32_t i) const;
  void AppendOwnSegments(const Sequence& seq, int32_t n, std::vector<KvSegment>* out) const;
  void InsertWaitingFront(std::vector<std::unique_ptr<Sequence>> seqs);
  // RAG request groups (engine_rag.cc).
  static uint64_t PreambleKey(const RagGroup& g);
  void StartGroup(RagGroup* g);
  void StartPaths(RagGroup* g);
  void OnPreambleDone(Sequence* seq);
  void OnPathDone(Sequence* seq, const float* logits);
  void Join(RagGroup* g);
  void FailGroup(RagGroup* g, FinishReason reason, absl::Status status);
  void ReleaseGroupBlocks(RagGroup* g);
  void FillRagResult(RagGroup* g, Sequence* answer);
  bool Step();  // false when idle
  void FinishSeq(Sequence* seq, FinishReason reason, absl::Status status);
  void FreeBlocks(Sequence* seq);
  void Preempt(Sequence* seq);
  bool EnsureBlocks(Sequence* seq, int32_t upto_tokens);
  void MatchPrefix(Sequence* seq);
  void PublishBlocks(Sequence* seq);
  // A sequence's next token and its log-probabilities (when asked for).
  struct Sampled {
    int32_t token = -1;
    std::vector<TokenLogprobs> logprobs;
  };
  // From the whole row `logits`, or (logits null) from a compact row: its best tokens
  // `top` and the log-sum-exp of the whole row.
  void EmitToken(Sequence* seq, const float* logits, absl::Span<const TopLogit> top = {},
                 float top_lse = 0.0f);
  // The sampler, detokenizer and stop checker of a sequence that streams tokens.
  void EnsureStreamState(Sequence* seq);
  // Draws the next token with seq's sampler (after EnsureStreamState); touches nothing
  // else of the engine or the sequence, so rows of different sequences may be sampled
  // on different threads. `scratch` is a row's worth of memory for the penalties.
  Sampled SampleNext(Sequence* seq, const float* logits, absl::Span<const TopLogit> top,
                     float top_lse, std::vector<float>* scratch) const;
  // Streams a sampled token; finishes the sequence when a stop condition holds.
  void EmitSampled(Sequence* seq, Sampled sampled);

  EngineOptions options_;
  ModelConfig config_;
  const Tokenizer* tokenizer_;
  Backend* backend_;
  int32_t block_size_;
  int32_t max_context_;
  std::unique_ptr<KvBlockManager> blocks_;
  EngineObserver* observer_ = nullptr;

  absl::Mutex mu_;
  absl::CondVar cv_;
  std::vector<std::unique_ptr<Sequence>> inbox_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<RagGroup>> group_inbox_ ABSL_GUARDED_BY(mu_);
  std::vector<uint64_t> cancels_ ABSL_GUARDED_BY(mu_);
  bool accepting_ ABSL_GUARDED_BY(mu_) = true;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time drain_deadline_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  int32_t waiting_requests_ ABSL_GUARDED_BY(mu_) = 0;  // client requests in waiting_
  uint64_t next_handle_ ABSL_GUARDED_BY(mu_) = 1;

  // Engine-thread state.
  std::deque<std::unique_ptr<Sequence>> waiting_;
  std::vector<std::unique_ptr<Sequence>> running_;
  std::vector<float> logits_scratch_;  // the sampler's copy of a whole row
  std::vector<std::unique_ptr<RagGroup>> groups_;
  std::unique_ptr<rag::PathCache> path_cache_;
  uint64_t next_internal_id_ = uint64_t{1} << 62;  // ids of RAG-internal sequences
  rag::FlopModel flop_model_;
  std::atomic<int64_t> stat_path_hits_{0};
  std::atomic<int64_t> stat_path_misses_{0};
  std::thread thread_;
  std::atomic<int32_t> stat_running_{0};
  std::atomic<int32_t> stat_waiting_{0};
  std::atomic<int64_t> stat_preemptions_{0};
  std::atomic<int64_t> stat_steps_{0};
};

}  // namespace superpose::engine
