#include "engine/runtime/engine.h"

#include <algorithm>
#include <atomic>
#include <deque>
#include <limits>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "engine/rag/planner.h"
#include "engine/runtime/adapters.h"
#include "engine/runtime/emitter.h"
#include "engine/runtime/lazy_steps.h"
#include "engine/runtime/scheduler.h"
#include "engine/runtime/step_plan.h"
#include "engine/sequence/sequence.h"
#include "engine/util/status.h"
#include "spdlog/spdlog.h"

namespace superpose::engine {
namespace {

struct Incoming {
  PendingRequest request;
  RequestOwner* owner = nullptr;  // null: a plain request
};

// The prompt tokens a request brings (all its segments for a RAG request).
int64_t PromptTokens(const Request& r) {
  if (r.rag == nullptr) return static_cast<int64_t>(r.prompt_ids.size());
  int64_t n =
      static_cast<int64_t>(r.rag->preamble.size() + r.rag->query.size() + r.rag->postamble.size());
  for (const auto& d : r.rag->documents) n += static_cast<int64_t>(d.size());
  return n;
}

}  // namespace

// The engine loop. It is the owner of plain requests (one emitting sequence each) and
// the host of owners that run several sequences per request.
class Engine::Impl final : public SequenceHost, public SequenceOwner {
 public:
  Impl(const EngineOptions& options, const ModelConfig& config, const Tokenizer* tokenizer,
       Backend* backend);

  void SetObserver(EngineObserver* observer) {
    observer_ = observer;
    emitter_.SetObserver(observer);
  }
  void Start() {
    thread_ = std::thread([this] { Loop(); });
  }
  void SetTenantPolicies(TenantPolicies policies) {
    auto p = std::make_shared<const TenantPolicies>(std::move(policies));
    absl::MutexLock lock(&mu_);
    policies_ = std::move(p);
  }
  absl::StatusOr<uint64_t> Submit(Request request, StreamCallback callback);
  void SetAdapters(AdapterManager* adapters) { adapters_ = adapters; }
  void Cancel(uint64_t handle);
  void Shutdown(absl::Duration grace);
  EngineStats stats() const;
  absl::Status Health() const;
  int32_t context_length() const { return max_context_; }
  const KvBlockManager& block_manager() const { return *blocks_; }

  // SequenceHost.
  KvBlockManager& blocks() override { return *blocks_; }
  int32_t block_size() const override { return block_size_; }
  uint64_t NewHandle() override { return next_internal_id_++; }
  void Enqueue(std::vector<std::unique_ptr<Sequence>> seqs, bool front) override;
  void Drop(Sequence& seq) override;
  void EmitFromRow(Sequence& seq, const float* row) override;
  void Deliver(StreamCallback& callback, StreamEvent ev) override;
  void StartLazy(Sequence* seq) override {
    StartLazySequence(seq->req.lazy, options_.lazy.min_prompt, options_.max_batch_tokens, seq);
    ReserveAux(seq);
  }

  // SequenceOwner of plain requests: their final event goes out as the engine built it.
  bool OnFinished(Sequence&, FinishReason, const absl::Status&, StreamEvent*) override {
    return true;
  }

 private:
  void Loop();
  // Takes what arrived; false when the loop should end.
  bool TakeInbox(bool* stopping, absl::Time* drain_deadline);
  void StartRequest(Incoming in);
  void DropExpired(const std::vector<uint64_t>& cancels, bool stopping, absl::Time deadline);
  void Sweep();
  void PublishCounts();
  void ZeroBlock(BlockId b);
  void ApplyPrivateMode(Request& request) const;
  // Pins request.adapter_id's adapter into request.adapter (docs/api.md "LoRA adapters").
  absl::Status ResolveAdapter(Request& request) const;
  // Tenant bounds of a new request (under mu_): RESOURCE_EXHAUSTED with a retry hint.
  absl::Status AdmitToQueue(PendingRequest* p) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Wraps a request's callback: its final event releases the tenant's tokens in flight.
  StreamCallback TrackTenant(const std::string& tenant, int64_t tokens, StreamCallback cb);
  bool QueuedTooLong(const Sequence& s, absl::Time now) const;
  int64_t RetryHintMs() const { return options_.max_queue_ms > 0 ? options_.max_queue_ms : 1000; }

  // One step: snapshot, decision, applied decision, plan, forward, outputs.
  bool Step();
  Snapshot TakeSnapshot();
  // The snapshot's tenants with their fair-share clocks (see the definition).
  int32_t TenantIndex(const std::string& tenant);
  void ShareTenants(Snapshot* snap);
  std::vector<std::pair<Sequence*, int32_t>> Apply(const Decision& d);
  void Admit(Sequence* seq, int32_t prefix_blocks);
  void HandleOutputs(const StepPlan& sp, const RowLayout& rows, const ForwardOutput& out);
  void SampleWholeRows(const StepPlan& sp, const RowLayout& rows, const ForwardOutput& out,
                       std::vector<Sampled>* presampled);
  void Advance(const StepEntry& e, const BatchPlan& plan, const ForwardOutput& out,
               const RowView& row, Sampled* presampled);
  void EmitAndCheck(Sequence& seq, Sampled sampled);

  void Finish(Sequence* seq, FinishReason reason, absl::Status status);
  void FreeBlocks(Sequence* seq);
  void Preempt(Sequence* seq);
  void ReserveAux(Sequence* seq);
  void ReleaseAux(Sequence* seq, bool done);
  bool EnsureBlocks(Sequence* seq, int32_t upto_tokens);
  bool UsesPrefixCache(const Sequence& seq) const {
    return options_.prefix_caching && seq.prefix_cache;
  }
  // How many of seq's first full blocks the prefix cache holds now (looked up, not
  // retained; at least one token is always left to compute, so that its logits exist).
  int32_t PrefixMatch(Sequence* seq) const;
  void ExtendChain(Sequence* seq, int32_t n) const;
  void MatchPrefix(Sequence* seq, int32_t max_blocks);
  void PublishBlocks(Sequence* seq);

  EngineOptions options_;
  ModelConfig config_;
  Backend* backend_;
  int32_t block_size_;
  int32_t max_context_;
  std::unique_ptr<KvBlockManager> blocks_;
  EngineObserver* observer_ = nullptr;
  Emitter emitter_;
  FlopModel flop_model_;
  SchedulerLimits limits_;
  StepPlanOptions plan_options_;
  std::vector<std::unique_ptr<RequestOwner>> owners_;
  AdapterManager* adapters_ = nullptr;

  mutable absl::Mutex mu_;
  absl::CondVar cv_;
  std::vector<Incoming> inbox_ ABSL_GUARDED_BY(mu_);
  std::vector<uint64_t> cancels_ ABSL_GUARDED_BY(mu_);
  bool accepting_ ABSL_GUARDED_BY(mu_) = true;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time drain_deadline_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  int32_t waiting_requests_ ABSL_GUARDED_BY(mu_) = 0;  // client requests waiting
  // The same by tenant, and each tenant's prompt tokens of requests not yet finished.
  absl::flat_hash_map<std::string, int32_t> tenant_waiting_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, int64_t> tenant_tokens_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<const TenantPolicies> policies_ ABSL_GUARDED_BY(mu_) =
      std::make_shared<const TenantPolicies>();
  uint64_t next_handle_ ABSL_GUARDED_BY(mu_) = 1;

  // Engine-thread state.
  std::deque<std::unique_ptr<Sequence>> waiting_;
  std::vector<std::unique_ptr<Sequence>> running_;
  // policies_ as of the last TakeInbox.
  std::shared_ptr<const TenantPolicies> step_policies_ = std::make_shared<const TenantPolicies>();
  absl::flat_hash_map<std::string, double> service_;  // fair-share clocks, active tenants
  std::vector<std::string> snap_tenants_;             // Snapshot::tenants' names
  absl::flat_hash_map<std::string, int32_t> snap_index_;
  std::vector<float> logits_scratch_;              // the sampler's copy of a whole row
  std::atomic<bool> zero_failed_{false};           // private mode: see ZeroBlock
  uint64_t next_internal_id_ = uint64_t{1} << 62;  // handles of owners' sequences
  std::thread thread_;
  std::atomic<int32_t> stat_running_{0};
  std::atomic<int32_t> stat_waiting_{0};
  std::atomic<int64_t> stat_preemptions_{0};
  int64_t aux_reserved_ = 0;  // LazyLLM Aux Cache budget held by running sequences
  std::atomic<int64_t> stat_steps_{0};
};

Engine::Impl::Impl(const EngineOptions& options, const ModelConfig& config,
                   const Tokenizer* tokenizer, Backend* backend)
    : options_(options),
      config_(config),
      backend_(backend),
      block_size_(backend->kv().block_size),
      max_context_(options.max_context > 0
                       ? std::min(config.max_position_embeddings, options.max_context)
                       : config.max_position_embeddings),
      blocks_(std::make_unique<KvBlockManager>(backend->kv().num_blocks)),
      emitter_(config_, tokenizer, max_context_),
      flop_model_(config) {
  options_.max_batch_tokens = std::max(1, options_.max_batch_tokens);
  options_.max_running = std::max(1, options_.max_running);
  limits_ = {options_.max_batch_tokens, options_.max_running, block_size_};
  plan_options_ = {block_size_, config_.vocab_size, options_.compact_logits,
                   backend_->SamplesRows()};
  rag::Limits rag_limits;
  rag_limits.context_length = max_context_;
  rag_limits.max_documents = options_.rag_max_documents;
  owners_.push_back(std::make_unique<rag::Planner>(this, config_, rag_limits));
  if (options_.private_mode) {
    options_.prefix_caching = false;
    blocks_->set_release_hook([this](BlockId b) { ZeroBlock(b); });
  }
}

// Private mode: a freed block's keys and values go before it can be reused. If that
// fails the engine fails closed: its health turns FAILED_PRECONDITION (the server
// reports NOT_SERVING and refuses new requests).
void Engine::Impl::ZeroBlock(BlockId b) {
  const BlockId one[] = {b};
  absl::Status st = backend_->ZeroKvBlocks(one);
  if (!st.ok() && !zero_failed_.exchange(true)) {
    spdlog::critical("private mode: zeroing a freed KV block failed: {}", st.ToString());
  }
}

absl::Status Engine::Impl::Health() const {
  if (zero_failed_.load()) {
    return absl::FailedPreconditionError("private mode: a freed KV block could not be zeroed");
  }
  return backend_->Health();
}

// Private mode: a RAG request never reads or fills the path cache.
void Engine::Impl::ApplyPrivateMode(Request& request) const {
  if (!options_.private_mode || request.rag == nullptr || !request.rag->options.path_cache) return;
  auto spec = std::make_shared<rag::Spec>(*request.rag);
  spec->options.path_cache = false;
  request.rag = std::move(spec);
}

absl::Status Engine::Impl::ResolveAdapter(Request& request) const {
  request.adapter = nullptr;
  if (request.adapter_id.empty()) return absl::OkStatus();
  if (!backend_->SupportsAdapters()) {
    return absl::UnimplementedError(absl::StrCat("adapter_id: the ", backend_->name(),
                                                 " backend does not serve LoRA adapters"));
  }
  if (adapters_ == nullptr) {
    return absl::InvalidArgumentError("adapter_id: this server has no adapters (--adapters)");
  }
  absl::StatusOr<std::shared_ptr<const AdapterRef>> ref = adapters_->Acquire(request.adapter_id);
  if (!ref.ok()) return ref.status();
  request.adapter = *std::move(ref);
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> Engine::Impl::Submit(Request request, StreamCallback callback) {
  // Every log line of the request carries its id: never let text through.
  absl::StatusOr<LogId> log_id = LogId::Of(request.request_id);
  if (!log_id.ok()) return log_id.status();
  ApplyPrivateMode(request);
  if (absl::Status st = ResolveAdapter(request); !st.ok()) return st;
  Incoming in;
  for (const auto& o : owners_) {
    if (o->Claims(request)) in.owner = o.get();
  }
  if (in.owner != nullptr) {
    absl::StatusOr<std::unique_ptr<Prepared>> prepared = in.owner->Validate(request);
    if (!prepared.ok()) return prepared.status();
    in.request.prepared = std::move(*prepared);
    if (in.owner->FlatPrompt(request)) {
      SP_RETURN_IF_ERROR(ResolveRequestLazy(options_.lazy, config_.num_layers,
                                            backend_->SupportsLazy(),
                                            backend_->SupportsLazyRevival(), &request.lazy));
    } else if (request.lazy.mode == LazyOptions::Mode::kOn) {
      return absl::InvalidArgumentError(
          "lazy: this request does not run as one prompt (GenerateRag prunes in rag.mode "
          "NAIVE only)");
    } else {
      request.lazy.mode = LazyOptions::Mode::kOff;
    }
  } else {
    const int64_t n = static_cast<int64_t>(request.prompt_ids.size());
    if (n == 0) return absl::InvalidArgumentError("prompt is empty");
    absl::Status lazy =
        ResolveRequestLazy(options_.lazy, config_.num_layers, backend_->SupportsLazy(),
                           backend_->SupportsLazyRevival(), &request.lazy);
    if (!lazy.ok()) return lazy;
    if (n >= max_context_) {
      return absl::InvalidArgumentError(
          absl::StrCat("prompt has ", n, " tokens; the context window is ", max_context_));
    }
  }
  in.request.arrival = absl::Now();
  in.request.log_id = *log_id;
  in.request.req = std::move(request);
  in.request.callback = std::move(callback);
  absl::MutexLock lock(&mu_);
  const int32_t queued = static_cast<int32_t>(inbox_.size()) + waiting_requests_;
  if (absl::Status st = CheckQueue(accepting_, Health(), queued, options_.max_waiting); !st.ok()) {
    return absl::IsResourceExhausted(st) ? WithRetryAfter(st, RetryHintMs()) : st;
  }
  if (absl::Status st = AdmitToQueue(&in.request); !st.ok()) return st;
  in.request.handle = next_handle_++;
  const uint64_t handle = in.request.handle;
  inbox_.push_back(std::move(in));
  cv_.Signal();
  return handle;
}

absl::Status Engine::Impl::AdmitToQueue(PendingRequest* p) {
  Request& req = p->req;
  const TenantPolicy& policy = policies_->For(req.tenant);
  req.priority = std::min(req.priority, policy.max_priority);
  int32_t queued = 0;
  for (const Incoming& in : inbox_) queued += in.request.req.tenant == req.tenant;
  if (auto it = tenant_waiting_.find(req.tenant); it != tenant_waiting_.end()) {
    queued += it->second;
  }
  const int64_t tokens = PromptTokens(req);
  int64_t& in_flight = tenant_tokens_[req.tenant];
  absl::Status st = CheckTenant(req.tenant, *policies_, queued, in_flight, tokens, RetryHintMs());
  if (!st.ok()) {
    if (in_flight == 0) tenant_tokens_.erase(req.tenant);
    return st;
  }
  in_flight += tokens;
  p->callback = TrackTenant(req.tenant, tokens, std::move(p->callback));
  return absl::OkStatus();
}

StreamCallback Engine::Impl::TrackTenant(const std::string& tenant, int64_t tokens,
                                         StreamCallback cb) {
  return [this, tenant, tokens, cb = std::move(cb)](StreamEvent&& ev) {
    if (ev.finished) {
      {
        absl::MutexLock lock(&mu_);
        auto it = tenant_tokens_.find(tenant);
        if (it != tenant_tokens_.end() && (it->second -= tokens) <= 0) tenant_tokens_.erase(it);
      }
      if (observer_ != nullptr) {
        observer_->OnTenantFinished(tenant, ev.usage, ev.finish_reason, ev.status);
      }
    }
    if (cb) cb(std::move(ev));
  };
}

void Engine::Impl::Cancel(uint64_t handle) {
  absl::MutexLock lock(&mu_);
  cancels_.push_back(handle);
  cv_.Signal();
}

void Engine::Impl::Shutdown(absl::Duration grace) {
  {
    absl::MutexLock lock(&mu_);
    accepting_ = false;
    drain_deadline_ = absl::Now() + grace;
    stop_ = true;
    cv_.Signal();
  }
  if (thread_.joinable()) thread_.join();
}

EngineStats Engine::Impl::stats() const {
  EngineStats s;
  s.running = stat_running_.load();
  s.waiting = stat_waiting_.load();
  s.kv_blocks_total = blocks_->num_blocks();
  s.kv_blocks_free = blocks_->free_blocks();
  s.kv_blocks_cached = blocks_->cached_blocks();
  s.preemptions = stat_preemptions_.load();
  s.steps = stat_steps_.load();
  for (const auto& o : owners_) {
    s.path_cache_hits += o->cache_hits();
    s.path_cache_misses += o->cache_misses();
  }
  return s;
}

void Engine::Impl::PublishCounts() {
  int32_t requests = 0;
  absl::flat_hash_map<std::string, int32_t> by_tenant;
  for (const auto& s : waiting_) {
    if (!s->counts_as_request || s->finished) continue;
    ++requests;
    ++by_tenant[s->req.tenant];
  }
  stat_running_ = static_cast<int32_t>(running_.size());
  stat_waiting_ = static_cast<int32_t>(waiting_.size());
  absl::MutexLock lock(&mu_);
  waiting_requests_ = requests;
  tenant_waiting_ = std::move(by_tenant);
}

// Drops finished sequences from the lists.
void Engine::Impl::Sweep() {
  auto gone = [](const std::unique_ptr<Sequence>& s) { return s->finished; };
  running_.erase(std::remove_if(running_.begin(), running_.end(), gone), running_.end());
  waiting_.erase(std::remove_if(waiting_.begin(), waiting_.end(), gone), waiting_.end());
  PublishCounts();
}

void Engine::Impl::Enqueue(std::vector<std::unique_ptr<Sequence>> seqs, bool front) {
  if (front) {
    waiting_.insert(waiting_.begin(), std::make_move_iterator(seqs.begin()),
                    std::make_move_iterator(seqs.end()));
    return;
  }
  for (auto& seq : seqs) {
    std::vector<int32_t> priorities;
    priorities.reserve(waiting_.size());
    for (const auto& w : waiting_) priorities.push_back(w->req.priority);
    const int32_t at = PriorityInsertIndex(priorities, seq->req.priority);
    waiting_.insert(waiting_.begin() + at, std::move(seq));
  }
}

void Engine::Impl::StartRequest(Incoming in) {
  if (in.owner != nullptr) {
    in.owner->Start(std::move(in.request));
    return;
  }
  PendingRequest& p = in.request;
  auto seq = std::make_unique<Sequence>();
  seq->handle = p.handle;
  seq->client_handle = p.handle;
  seq->log_id = p.log_id;
  seq->arrival = p.arrival;
  seq->tokens = p.req.prompt_ids;
  seq->prompt_len = static_cast<int32_t>(seq->tokens.size());
  seq->req = std::move(p.req);
  seq->callback = std::move(p.callback);
  seq->owner = this;
  seq->emits = true;
  seq->prefix_cache = true;
  StartLazy(seq.get());
  std::vector<std::unique_ptr<Sequence>> one;
  one.push_back(std::move(seq));
  Enqueue(std::move(one), /*front=*/false);
}

bool Engine::Impl::TakeInbox(bool* stopping, absl::Time* drain_deadline) {
  std::vector<Incoming> incoming;
  std::vector<uint64_t> cancels;
  {
    absl::MutexLock lock(&mu_);
    while (inbox_.empty() && cancels_.empty() && !stop_ && running_.empty() && waiting_.empty()) {
      cv_.Wait(&mu_);
    }
    incoming.swap(inbox_);
    // They count as waiting until the next PublishCounts() recounts.
    waiting_requests_ += static_cast<int32_t>(incoming.size());
    for (const Incoming& in : incoming) ++tenant_waiting_[in.request.req.tenant];
    step_policies_ = policies_;
    cancels.swap(cancels_);
    *stopping = stop_;
    *drain_deadline = drain_deadline_;
  }
  for (Incoming& in : incoming) StartRequest(std::move(in));
  DropExpired(cancels, *stopping, *drain_deadline);
  Sweep();
  if (*stopping && running_.empty() && waiting_.empty()) {
    absl::MutexLock lock(&mu_);
    return !inbox_.empty();
  }
  return true;
}

// Client cancels, deadlines, a shutdown's refusal of requests not yet admitted and the
// end of its grace. Marking first and sweeping after: finishing one sequence of a
// request may finish its siblings too.
void Engine::Impl::DropExpired(const std::vector<uint64_t>& cancels, bool stopping,
                               absl::Time drain_deadline) {
  const absl::Time now = absl::Now();
  auto check = [&](Sequence* s) {
    if (s->finished) return;
    if (std::find(cancels.begin(), cancels.end(), s->client_handle) != cancels.end()) {
      Finish(s, FinishReason::kCancelled, absl::CancelledError("cancelled by the client"));
    } else if (s->req.deadline < now) {
      Finish(s, FinishReason::kCancelled, absl::DeadlineExceededError("deadline exceeded"));
    } else if (stopping && !s->owner->RequestAdmitted(*s)) {
      Finish(s, FinishReason::kNone,
             absl::UnavailableError("server is shutting down; the request was not started"));
    } else if (stopping && now >= drain_deadline) {
      Finish(s, FinishReason::kCancelled, absl::OkStatus());
    } else if (QueuedTooLong(*s, now)) {
      if (observer_ != nullptr) observer_->OnQueueTimeout(s->req.tenant);
      spdlog::info("req={} refused: queued longer than max_queue_ms={}", s->log_id.str(),
                   options_.max_queue_ms);
      Finish(
          s, FinishReason::kNone,
          WithRetryAfter(absl::ResourceExhaustedError(absl::StrCat(
                             "not admitted within ", options_.max_queue_ms,
                             " ms (the server's max_queue_ms): the server is busy, retry later")),
                         RetryHintMs()));
    }
  };
  for (auto& s : running_) check(s.get());
  for (auto& s : waiting_) check(s.get());
}

// A client request not admitted within max_queue_ms (its first sequence for a RAG
// request: the sequences of an admitted request are not refused).
bool Engine::Impl::QueuedTooLong(const Sequence& s, absl::Time now) const {
  return options_.max_queue_ms > 0 && s.counts_as_request && s.scheduled == absl::InfinitePast() &&
         now - s.arrival > absl::Milliseconds(options_.max_queue_ms);
}

void Engine::Impl::Loop() {
  while (true) {
    bool stopping = false;
    absl::Time drain_deadline;
    if (!TakeInbox(&stopping, &drain_deadline)) break;
    if (stopping && running_.empty() && waiting_.empty()) continue;
    const bool stepped = Step();
    Sweep();
    if (!stepped && stopping) {
      // Nothing could be scheduled while draining: wait for the deadline.
      absl::SleepFor(absl::Milliseconds(1));
    }
  }
  stat_running_ = 0;
  stat_waiting_ = 0;
}

void Engine::Impl::FreeBlocks(Sequence* seq) {
  for (BlockId b : seq->blocks) blocks_->Release(b);
  seq->blocks.clear();
  seq->published_blocks = 0;
  seq->computed = 0;
}

void Engine::Impl::Drop(Sequence& seq) {
  seq.finished = true;
  FreeBlocks(&seq);
  ReleaseAux(&seq, true);
}

// Revival under memory pressure: past the Aux Cache budget a sequence decodes without
// revival (LazyEngineOptions::aux_budget_bytes).
void Engine::Impl::ReserveAux(Sequence* seq) {
  if (!seq->lazy.revive) return;
  const int64_t need = int64_t{seq->prompt_len} * config_.hidden_size * int64_t{sizeof(float)};
  if (aux_reserved_ + need > options_.lazy.aux_budget_bytes) {
    seq->lazy.revive = false;
    spdlog::debug("req={} lazy revival off: Aux Cache budget", seq->log_id.str());
    return;
  }
  aux_reserved_ += need;
  seq->lazy.aux_reserved = need;
}

// The backend's Aux Cache of seq (refilled by a recomputation's replay); with `done`,
// its share of the budget too.
void Engine::Impl::ReleaseAux(Sequence* seq, bool done) {
  if (!seq->lazy.revive && seq->lazy.aux_reserved == 0) return;
  backend_->ReleaseSequence(static_cast<SeqId>(seq->handle));
  if (!done) return;
  aux_reserved_ -= seq->lazy.aux_reserved;
  seq->lazy.aux_reserved = 0;
}

void Engine::Impl::Finish(Sequence* seq, FinishReason reason, absl::Status status) {
  if (seq->finished) return;
  seq->finished = true;
  FreeBlocks(seq);
  ReleaseAux(seq, true);
  StreamEvent ev;
  if (seq->emits) {
    ev = emitter_.FinalEvent(*seq, reason, status);
  } else {
    ev.finished = true;
    ev.finish_reason = reason;
    ev.status = status;
  }
  if (!seq->owner->OnFinished(*seq, reason, status, &ev)) return;
  if (ev.rag != nullptr && status.ok() && observer_ != nullptr) observer_->OnRagFinished(*ev.rag);
  const Usage& u = ev.usage;
  spdlog::info(
      "req={} finish={} status={} prompt_tokens={} cached_tokens={} new_tokens={} "
      "queue_ms={:.1f} ttft_ms={:.1f} total_ms={:.1f}",
      seq->log_id.str(), FinishReasonName(reason), absl::StatusCodeToString(status.code()),
      u.prompt_tokens, u.cached_prompt_tokens, u.generated_tokens, u.queue_time_ms, u.ttft_ms,
      u.total_time_ms);
  Deliver(seq->callback, std::move(ev));
}

void Engine::Impl::Deliver(StreamCallback& callback, StreamEvent ev) {
  if (observer_ != nullptr) observer_->OnFinished(ev.usage, ev.finish_reason, ev.status);
  if (callback) callback(std::move(ev));
  callback = nullptr;
}

void Engine::Impl::Preempt(Sequence* seq) {
  FreeBlocks(seq);
  ReleaseAux(seq, false);  // the recomputation refills it as it replays
  seq->owner->OnPreempted(*seq);
  stat_preemptions_.fetch_add(1);
  if (observer_ != nullptr) observer_->OnPreempted();
  spdlog::debug("req={} preempted tokens={}", seq->log_id.str(), seq->tokens.size());
}

bool Engine::Impl::EnsureBlocks(Sequence* seq, int32_t upto_tokens) {
  const int32_t need = BlocksFor(seq->gap_at, block_size_, upto_tokens);
  while (static_cast<int32_t>(seq->blocks.size()) < need) {
    std::optional<BlockId> b = blocks_->Allocate();
    if (!b) return false;
    seq->blocks.push_back(*b);
  }
  return true;
}

// Extends seq's block chain over its first `n` full blocks of tokens.
void Engine::Impl::ExtendChain(Sequence* seq, int32_t n) const {
  std::vector<uint64_t>& chain = seq->block_chain;
  while (static_cast<int32_t>(chain.size()) < n) {
    // Keyed by tenant and adapter: a LoRA adapter on k or v changes the KV.
    const uint64_t parent = chain.empty()
                                ? HashString(HashString(0x5eed, seq->req.tenant),
                                             absl::StrCat("adapter:", seq->req.adapter_key()))
                                : chain.back();
    chain.push_back(
        HashBlock(parent, seq->tokens.data() + chain.size() * block_size_, block_size_));
  }
}

int32_t Engine::Impl::PrefixMatch(Sequence* seq) const {
  if (!UsesPrefixCache(*seq) || seq->computed != 0 || !seq->blocks.empty()) return 0;
  // Full blocks that may match: at least one token is always left to compute; a
  // recomputed LazyLLM sequence reuses no more than its decision saw cached.
  int32_t candidates = (static_cast<int32_t>(seq->tokens.size()) - 1) / block_size_;
  if (seq->lazy.decided()) candidates = std::min(candidates, seq->lazy.decided_at / block_size_);
  ExtendChain(seq, candidates);
  int32_t n = 0;
  while (n < candidates && blocks_->Contains(seq->block_chain[n])) ++n;
  return n;
}

// Reuses cached full blocks of the prompt (same tenant, same preceding tokens).
void Engine::Impl::MatchPrefix(Sequence* seq, int32_t max_blocks) {
  if (max_blocks <= 0) return;
  const int32_t available = std::min(max_blocks, PrefixMatch(seq));
  int32_t matched = 0;
  for (int32_t i = 0; i < available; ++i) {
    const uint64_t h = seq->block_chain[i];
    std::optional<BlockId> b = blocks_->Lookup(h);
    if (!b) break;
    seq->blocks.push_back(*b);
    ++matched;
  }
  seq->published_blocks = matched;
  seq->computed = matched * block_size_;
  if (seq->generated == 0) seq->cached_prompt_tokens = std::min(seq->computed, seq->prompt_len);
}

void Engine::Impl::PublishBlocks(Sequence* seq) {
  if (!UsesPrefixCache(*seq) || !seq->publishes_prefix) return;
  const int32_t full = seq->computed / block_size_;
  ExtendChain(seq, full);
  for (; seq->published_blocks < full; ++seq->published_blocks) {
    blocks_->Publish(seq->blocks[seq->published_blocks], seq->block_chain[seq->published_blocks]);
  }
}

Snapshot Engine::Impl::TakeSnapshot() {
  Snapshot snap;
  snap.free_blocks = blocks_->free_blocks();
  snap_tenants_.clear();
  snap_index_.clear();
  for (const auto& s : running_) {
    SeqSnapshot x{s->computed, static_cast<int32_t>(s->tokens.size()), s->gap_at,
                  static_cast<int32_t>(s->blocks.size())};
    for (BlockId b : s->blocks) x.exclusive_blocks += blocks_->refcount(b) == 1;
    x.tenant = TenantIndex(s->req.tenant);
    x.whole = s->lazy.active() && !s->lazy.decided();
    snap.running.push_back(x);
  }
  // Only each tenant's queue head can be admitted this step: prefix matches beyond it
  // are not looked up.
  const int32_t head = std::max(0, options_.max_running - static_cast<int32_t>(running_.size()));
  std::vector<int32_t> seen;  // waiting sequences per tenant so far
  for (size_t i = 0; i < waiting_.size(); ++i) {
    Sequence* s = waiting_[i].get();
    SeqSnapshot x{s->computed, static_cast<int32_t>(s->tokens.size()), s->gap_at,
                  static_cast<int32_t>(s->blocks.size())};
    x.tenant = TenantIndex(s->req.tenant);
    x.started = s->scheduled != absl::InfinitePast();
    x.whole = s->lazy.active() && !s->lazy.decided();
    seen.resize(snap_tenants_.size(), 0);
    if (seen[x.tenant]++ < head) {
      x.prefix_blocks = PrefixMatch(s);
      for (int32_t k = 0; k < x.prefix_blocks; ++k) {
        x.prefix_unreferenced += blocks_->refcount(*blocks_->Peek(s->block_chain[k])) == 0;
      }
    }
    snap.waiting.push_back(x);
  }
  ShareTenants(&snap);
  return snap;
}

int32_t Engine::Impl::TenantIndex(const std::string& tenant) {
  auto [it, inserted] = snap_index_.try_emplace(tenant, static_cast<int32_t>(snap_tenants_.size()));
  if (inserted) snap_tenants_.push_back(tenant);
  return it->second;
}

// The fair-share clocks live while a tenant has work: one that had none starts level
// with the least-served active tenant (idle time earns no credit), and the clocks of
// tenants without work are dropped.
void Engine::Impl::ShareTenants(Snapshot* snap) {
  double level = std::numeric_limits<double>::infinity();
  for (const std::string& t : snap_tenants_) {
    if (auto it = service_.find(t); it != service_.end()) level = std::min(level, it->second);
  }
  if (level == std::numeric_limits<double>::infinity()) level = 0;
  absl::flat_hash_map<std::string, double> active;
  for (const std::string& t : snap_tenants_) {
    auto it = service_.find(t);
    const double clock = it != service_.end() ? it->second : level;
    active[t] = clock;
    const TenantPolicy& p = step_policies_->For(t);
    snap->tenants.push_back({clock, p.weight, p.max_running});
  }
  service_ = std::move(active);
}

// Applies a decision: preemptions, failures, admissions (prefix matches first, so that
// no allocation evicts a block about to be matched), then every scheduled sequence's
// blocks. Returns what runs this step, in plan order.
std::vector<std::pair<Sequence*, int32_t>> Engine::Impl::Apply(const Decision& d) {
  std::vector<Sequence*> run(running_.size()), wait(waiting_.size());
  for (size_t i = 0; i < run.size(); ++i) run[i] = running_[i].get();
  for (size_t i = 0; i < wait.size(); ++i) wait[i] = waiting_[i].get();
  auto at = [&](const SeqRef& r) { return r.waiting ? wait[r.index] : run[r.index]; };
  // The new lists: running = still running + admitted; waiting = victims + the rest.
  std::vector<std::unique_ptr<Sequence>> new_running;
  std::deque<std::unique_ptr<Sequence>> new_waiting;
  std::vector<bool> run_moved(run.size(), false), wait_moved(wait.size(), false);
  for (int32_t v : d.preempted) {
    Preempt(run[v]);
    new_waiting.push_front(std::move(running_[v]));
    run_moved[v] = true;
  }
  for (const Decision::Failed& f : d.failed) Finish(at(f.seq), FinishReason::kNone, f.status);
  for (size_t i = 0; i < run.size(); ++i) {
    if (!run_moved[i]) new_running.push_back(std::move(running_[i]));
  }
  std::vector<std::pair<Sequence*, int32_t>> sched;
  for (const Decision::Scheduled& s : d.scheduled) {
    Sequence* seq = at(s.seq);
    if (seq->finished) continue;  // a sibling of a request that failed above
    const bool admitted = s.seq.waiting || run_moved[s.seq.index];
    if (admitted) {
      Admit(seq, s.prefix_blocks);
      if (s.seq.waiting) {
        new_running.push_back(std::move(waiting_[s.seq.index]));
        wait_moved[s.seq.index] = true;
      } else {  // a victim admitted again
        auto it = std::find_if(new_waiting.begin(), new_waiting.end(),
                               [&](const auto& p) { return p.get() == seq; });
        new_running.push_back(std::move(*it));
        new_waiting.erase(it);
      }
    }
    sched.emplace_back(seq, s.num_tokens);
  }
  for (size_t i = 0; i < wait.size(); ++i) {
    if (!wait_moved[i]) new_waiting.push_back(std::move(waiting_[i]));
  }
  running_ = std::move(new_running);
  waiting_ = std::move(new_waiting);
  // Blocks for every scheduled sequence. The decision counted them; should the pool
  // still disagree (blocks shared among victims), the sequence sits this step out.
  std::vector<std::pair<Sequence*, int32_t>> out;
  for (auto& [seq, n] : sched) {
    n = std::min(n, seq->remaining());
    DropChunkedLazy(seq, n);
    CapLazyReplay(*seq, &n);
    if (n > 0 && EnsureBlocks(seq, seq->computed + n)) out.emplace_back(seq, n);
  }
  return out;
}

void Engine::Impl::Admit(Sequence* seq, int32_t prefix_blocks) {
  MatchPrefix(seq, prefix_blocks);
  if (seq->scheduled == absl::InfinitePast()) {
    seq->scheduled = absl::Now();
    seq->owner->OnAdmitted(*seq);
  }
}

bool Engine::Impl::Step() {
  const Decision d = Schedule(TakeSnapshot(), limits_);
  for (size_t t = 0; t < d.service.size() && t < snap_tenants_.size(); ++t) {
    service_[snap_tenants_[t]] = d.service[t];
  }
  const std::vector<std::pair<Sequence*, int32_t>> sched = Apply(d);
  PublishCounts();
  if (sched.empty()) return false;
  const StepPlan sp = BuildStepPlan(sched, plan_options_);
  for (const StepEntry& e : sp.entries) {
    e.seq->flops +=
        flop_model_.Segment(e.seq->ctx_tokens + e.seq->computed, e.num_tokens, e.lm_rows());
  }
  ForwardOutput out;
  absl::Status st = backend_->Forward(sp.plan, &out);
  stat_steps_.fetch_add(1);
  if (observer_ != nullptr) {
    observer_->OnStep(static_cast<int32_t>(running_.size()), static_cast<int32_t>(waiting_.size()),
                      sp.plan.num_tokens());
  }
  if (!st.ok()) {
    spdlog::error("forward failed: {}", st.ToString());
    st = absl::InternalError(absl::StrCat("backend failure: ", st.message()));
  }
  const RowLayout rows(sp.plan);
  if (st.ok() && !(st = rows.Check(out, config_.vocab_size)).ok()) {
    spdlog::error("forward returned logits of the wrong shape");
  }
  if (!st.ok()) {
    for (const StepEntry& e : sp.entries) Finish(e.seq, FinishReason::kNone, st);
    return true;
  }
  for (const ForwardOutput::Lazy& r : out.lazy) {
    Sequence* seq = sp.entries[r.seq].seq;
    const bool first = !seq->lazy.decided();
    if (!first) {
      const int64_t revived = TakeLazyRevival(r, seq);
      if (revived > 0 && observer_ != nullptr) observer_->OnLazyRevived(revived);
      continue;
    }
    const int64_t pruned = TakeLazyDecision(r, seq);
    if (observer_ != nullptr) observer_->OnLazyPrefill(seq->prompt_len, pruned);
  }
  HandleOutputs(sp, rows, out);
  return true;
}

// Whole rows are sampled in parallel first (a sampled row of a large vocabulary is tens
// to hundreds of microseconds; each sequence has its own sampler and generator, so the
// tokens do not depend on the threads). Streaming stays in order.
void Engine::Impl::SampleWholeRows(const StepPlan& sp, const RowLayout& rows,
                                   const ForwardOutput& out, std::vector<Sampled>* presampled) {
  std::vector<size_t> whole;
  for (size_t k = 0; k < sp.entries.size(); ++k) {
    const StepEntry& e = sp.entries[k];
    if (!e.seq->emits || e.seq->finished || e.logits_row < 0 || !e.completes()) continue;
    if (!RowLayout::Whole(sp.plan, e.logits_row)) continue;
    emitter_.EnsureStream(*e.seq);
    whole.push_back(k);
  }
  const int64_t n = static_cast<int64_t>(whole.size());
  const int32_t V = config_.vocab_size;
#pragma omp parallel for schedule(dynamic, 1) if (n > 1)
  for (int64_t i = 0; i < n; ++i) {
    thread_local std::vector<float> scratch;
    const StepEntry& e = sp.entries[whole[i]];
    (*presampled)[whole[i]] = emitter_.Sample(*e.seq, rows.Row(out, e.logits_row, V), &scratch);
  }
}

void Engine::Impl::HandleOutputs(const StepPlan& sp, const RowLayout& rows,
                                 const ForwardOutput& out) {
  std::vector<Sampled> presampled(sp.entries.size());
  SampleWholeRows(sp, rows, out, &presampled);
  for (size_t k = 0; k < sp.entries.size(); ++k) {
    const StepEntry& e = sp.entries[k];
    if (e.seq->finished) continue;  // its request failed earlier in this loop
    const RowView row =
        e.logits_row >= 0 ? rows.Row(out, e.logits_row, config_.vocab_size) : RowView{};
    Advance(e, sp.plan, out, row, &presampled[k]);
  }
}

// A sequence's step is done: its K/V are in, its scores go to its owner, and when it
// has computed every token its row is sampled (emitting) or handed to its owner.
void Engine::Impl::Advance(const StepEntry& e, const BatchPlan& plan, const ForwardOutput& out,
                           const RowView& row, Sampled* presampled) {
  Sequence& seq = *e.seq;
  const int32_t first = seq.computed;
  seq.computed += e.num_tokens;
  PublishBlocks(&seq);
  // Scores: plan token t predicts own token first + (t - token_begin) + 1.
  for (int32_t r = e.lp_begin; r < e.lp_end; ++r) {
    const int32_t target = first + (plan.logprobs[r].token_index - e.token_begin) + 1;
    seq.owner->OnScore(seq, target, out.logprobs[r]);
  }
  if (seq.computed < static_cast<int32_t>(seq.tokens.size())) return;
  if (!seq.emits) {
    seq.owner->OnComputed(seq, row.whole);
    seq.finished = true;  // retired: the owner took what it needed
    FreeBlocks(&seq);
    return;
  }
  if (presampled->token >= 0) {
    EmitAndCheck(seq, std::move(*presampled));
    return;
  }
  emitter_.EnsureStream(seq);
  EmitAndCheck(seq, emitter_.Sample(seq, row, &logits_scratch_));
}

void Engine::Impl::EmitAndCheck(Sequence& seq, Sampled sampled) {
  const FinishReason reason = emitter_.Emit(seq, std::move(sampled));
  if (reason != FinishReason::kNone) Finish(&seq, reason, absl::OkStatus());
}

void Engine::Impl::EmitFromRow(Sequence& seq, const float* row) {
  emitter_.EnsureStream(seq);
  RowView v;
  v.whole = row;
  EmitAndCheck(seq, emitter_.Sample(seq, v, &logits_scratch_));
}

// ---- Engine: the public face ----

Engine::Engine(const EngineOptions& options, const ModelConfig& config, const Tokenizer* tokenizer,
               Backend* backend)
    : impl_(std::make_unique<Impl>(options, config, tokenizer, backend)) {}
Engine::~Engine() { impl_->Shutdown(absl::ZeroDuration()); }
void Engine::SetObserver(EngineObserver* observer) { impl_->SetObserver(observer); }
void Engine::SetTenantPolicies(TenantPolicies policies) {
  impl_->SetTenantPolicies(std::move(policies));
}
void Engine::SetAdapters(AdapterManager* adapters) { impl_->SetAdapters(adapters); }
void Engine::Start() { impl_->Start(); }
absl::StatusOr<uint64_t> Engine::Submit(Request request, StreamCallback callback) {
  return impl_->Submit(std::move(request), std::move(callback));
}
void Engine::Cancel(uint64_t handle) { impl_->Cancel(handle); }
void Engine::Shutdown(absl::Duration grace) { impl_->Shutdown(grace); }
EngineStats Engine::stats() const { return impl_->stats(); }
absl::Status Engine::Health() const { return impl_->Health(); }
int32_t Engine::context_length() const { return impl_->context_length(); }
const KvBlockManager& Engine::blocks() const { return impl_->block_manager(); }

}  // namespace superpose::engine
