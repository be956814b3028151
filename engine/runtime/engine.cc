#include "engine/runtime/engine.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "engine/runtime/engine_internal.h"
#include "spdlog/spdlog.h"

namespace superpose::engine {

namespace {
double Ms(absl::Duration d) { return absl::ToDoubleMilliseconds(d); }

// Plain prompts start at position 0 with no ancestors, and so do RAG preambles, which
// use the prefix cache unless the path cache holds them whole.
bool UsesPrefixCache(const Engine::Sequence& seq) {
  return seq.role == SeqRole::kGenerate ||
         (seq.role == SeqRole::kPreamble && !seq.group->spec().options.path_cache);
}
}  // namespace

Engine::Engine(const EngineOptions& options, const ModelConfig& config, const Tokenizer* tokenizer,
               Backend* backend)
    : options_(options),
      config_(config),
      tokenizer_(tokenizer),
      backend_(backend),
      flop_model_(config) {
  const KvPoolInfo kv = backend_->kv();
  block_size_ = kv.block_size;
  blocks_ = std::make_unique<KvBlockManager>(kv.num_blocks);
  path_cache_ = std::make_unique<rag::PathCache>(blocks_.get());
  max_context_ = config.max_position_embeddings;
  if (options_.max_context > 0) max_context_ = std::min(max_context_, options_.max_context);
  options_.max_batch_tokens = std::max(1, options_.max_batch_tokens);
  options_.max_running = std::max(1, options_.max_running);
}

Engine::~Engine() { Shutdown(absl::ZeroDuration()); }

void Engine::Start() {
  thread_ = std::thread([this] { Loop(); });
}

absl::StatusOr<uint64_t> Engine::Submit(Request request, StreamCallback callback) {
  // Every log line of the request carries its id: never let text through.
  absl::StatusOr<LogId> log_id = LogId::Of(request.request_id);
  if (!log_id.ok()) return log_id.status();
  if (request.rag != nullptr) {
    if (absl::Status st = ValidateRag(*request.rag); !st.ok()) return st;
    if (request.rag->options.mode == rag::Mode::kNaive) {
      request.prompt_ids = rag::Flatten(*request.rag);
    } else {
      auto g = std::make_unique<RagGroup>();
      g->arrival = absl::Now();
      g->log_id = *log_id;
      g->layout = rag::ComputeLayout(*request.rag);
      g->req = std::move(request);
      g->callback = std::move(callback);
      absl::MutexLock lock(&mu_);
      if (absl::Status st = CanQueue(); !st.ok()) return st;
      g->handle = next_handle_++;
      const uint64_t handle = g->handle;
      group_inbox_.push_back(std::move(g));
      cv_.Signal();
      return handle;
    }
  }
  auto seq = std::make_unique<Sequence>();
  seq->arrival = absl::Now();
  seq->log_id = *log_id;
  seq->tokens = request.prompt_ids;
  seq->prompt_len = static_cast<int32_t>(request.prompt_ids.size());
  seq->req = std::move(request);
  seq->callback = std::move(callback);
  if (seq->prompt_len == 0) return absl::InvalidArgumentError("prompt is empty");
  if (seq->prompt_len >= max_context_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt has ", seq->prompt_len, " tokens; the context window is ", max_context_));
  }
  absl::MutexLock lock(&mu_);
  if (absl::Status st = CanQueue(); !st.ok()) return st;
  seq->handle = next_handle_++;
  const uint64_t handle = seq->handle;
  inbox_.push_back(std::move(seq));
  cv_.Signal();
  return handle;
}

absl::Status Engine::CanQueue() const {
  if (!accepting_) return absl::UnavailableError("server is shutting down");
  if (absl::Status h = backend_->Health(); !h.ok()) {
    return absl::UnavailableError(
        absl::StrCat("the model backend failed (restart the server): ", h.message()));
  }
  if (static_cast<int32_t>(inbox_.size() + group_inbox_.size()) + waiting_requests_ >=
      options_.max_waiting) {
    return absl::ResourceExhaustedError(
        absl::StrCat("waiting queue is full (", options_.max_waiting, " requests)"));
  }
  return absl::OkStatus();
}

void Engine::Cancel(uint64_t handle) {
  absl::MutexLock lock(&mu_);
  cancels_.push_back(handle);
  cv_.Signal();
}

void Engine::Shutdown(absl::Duration grace) {
  {
    absl::MutexLock lock(&mu_);
    accepting_ = false;
    drain_deadline_ = absl::Now() + grace;
    stop_ = true;
    cv_.Signal();
  }
  if (thread_.joinable()) thread_.join();
}

EngineStats Engine::stats() const {
  EngineStats s;
  s.running = stat_running_.load();
  s.waiting = stat_waiting_.load();
  s.kv_blocks_total = blocks_->num_blocks();
  s.kv_blocks_free = blocks_->free_blocks();
  s.kv_blocks_cached = blocks_->cached_blocks();
  s.preemptions = stat_preemptions_.load();
  s.steps = stat_steps_.load();
  s.path_cache_hits = stat_path_hits_.load();
  s.path_cache_misses = stat_path_misses_.load();
  return s;
}

absl::Status Engine::ValidateRag(const rag::Spec& spec) const {
  const int32_t n = static_cast<int32_t>(spec.documents.size());
  if (n == 0) return absl::InvalidArgumentError("documents: at least one document is required");
  if (n > options_.rag_max_documents) {
    return absl::InvalidArgumentError(
        absl::StrCat("documents: ", n, " documents; the limit is ", options_.rag_max_documents));
  }
  if (spec.query.empty()) return absl::InvalidArgumentError("query is empty");
  if (spec.options.top_k < 1 || spec.options.top_k > n) {
    return absl::InvalidArgumentError(
        absl::StrCat("rag.top_k must be in [1, ", n, "], got ", spec.options.top_k));
  }
  const int64_t fixed = spec.preamble.size() + spec.query.size() + spec.postamble.size();
  for (int32_t i = 0; i < n; ++i) {
    if (spec.documents[i].empty()) {
      return absl::InvalidArgumentError(absl::StrCat("documents[", i, "] is empty"));
    }
    if (fixed + static_cast<int64_t>(spec.documents[i].size()) >= max_context_) {
      return absl::InvalidArgumentError(
          absl::StrCat("documents[", i, "] has ", spec.documents[i].size(),
                       " tokens; with the preamble, query and postamble it exceeds the context "
                       "window of ",
                       max_context_));
    }
  }
  if (spec.options.mode == rag::Mode::kNaive) {
    const int64_t total = rag::FlatSize(spec);
    if (total >= max_context_) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the concatenated prompt has ", total, " tokens; the context window is ", max_context_));
    }
  } else if (const float start = rag::ComputeLayout(spec).answer_start;
             start >= static_cast<float>(max_context_)) {
    return absl::InvalidArgumentError(
        absl::StrCat("rag.canonical_span: the answer would start at position ", start,
                     ", beyond the context window of ", max_context_));
  }
  return absl::OkStatus();
}

void Engine::PublishCounts() {
  int32_t requests = 0;
  for (const auto& s : waiting_)
    requests += s->role == SeqRole::kGenerate || s->role == SeqRole::kPreamble;
  stat_running_ = static_cast<int32_t>(running_.size());
  stat_waiting_ = static_cast<int32_t>(waiting_.size());
  absl::MutexLock lock(&mu_);
  waiting_requests_ = requests;
}

// Drops finished sequences from the lists and finished groups nobody references.
void Engine::Sweep() {
  auto gone = [](const std::unique_ptr<Sequence>& s) { return s->finished; };
  running_.erase(std::remove_if(running_.begin(), running_.end(), gone), running_.end());
  waiting_.erase(std::remove_if(waiting_.begin(), waiting_.end(), gone), waiting_.end());
  groups_.erase(std::remove_if(groups_.begin(), groups_.end(),
                               [&](const std::unique_ptr<RagGroup>& g) {
                                 if (!g->done) return false;
                                 for (const auto& s : running_) {
                                   if (s->group == g.get()) return false;
                                 }
                                 for (const auto& s : waiting_) {
                                   if (s->group == g.get()) return false;
                                 }
                                 return true;
                               }),
                groups_.end());
  PublishCounts();
}

void Engine::InsertWaitingFront(std::vector<std::unique_ptr<Sequence>> seqs) {
  waiting_.insert(waiting_.begin(), std::make_move_iterator(seqs.begin()),
                  std::make_move_iterator(seqs.end()));
}

// Own token i is stored at slot index Storage(i) of the sequence's blocks: in order,
// except that tokens from gap_at on start on a fresh block (a path's query after its
// document, so that the document's blocks hold nothing else and can be cached).
int32_t Engine::Storage(const Sequence& seq, int32_t i) const {
  if (seq.gap_at < 0 || i < seq.gap_at) return i;
  const int32_t fresh = (seq.gap_at + block_size_ - 1) / block_size_ * block_size_;
  return fresh + (i - seq.gap_at);
}

void Engine::AppendOwnSegments(const Sequence& seq, int32_t n, std::vector<KvSegment>* out) const {
  for (int32_t i = 0; i < n;) {
    const int32_t st = Storage(seq, i);
    const int32_t slot = st % block_size_;
    int32_t len = std::min(block_size_ - slot, n - i);
    if (seq.gap_at >= 0 && i < seq.gap_at) len = std::min(len, seq.gap_at - i);
    out->push_back({seq.blocks[st / block_size_], slot, len});
    i += len;
  }
}

void Engine::Loop() {
  while (true) {
    std::vector<std::unique_ptr<Sequence>> incoming;
    std::vector<std::unique_ptr<RagGroup>> incoming_groups;
    std::vector<uint64_t> cancels;
    bool stopping;
    absl::Time drain_deadline;
    {
      absl::MutexLock lock(&mu_);
      while (inbox_.empty() && group_inbox_.empty() && cancels_.empty() && !stop_ &&
             running_.empty() && waiting_.empty()) {
        cv_.Wait(&mu_);
      }
      incoming.swap(inbox_);
      incoming_groups.swap(group_inbox_);
      // They count as waiting until the next PublishCounts() recounts.
      waiting_requests_ += static_cast<int32_t>(incoming.size() + incoming_groups.size());
      cancels.swap(cancels_);
      stopping = stop_;
      drain_deadline = drain_deadline_;
    }
    for (auto& seq : incoming) {
      // Priority order among waiting requests; FCFS within a priority.
      auto it = std::find_if(waiting_.begin(), waiting_.end(),
                             [&](const auto& w) { return w->req.priority < seq->req.priority; });
      waiting_.insert(it, std::move(seq));
    }
    for (auto& g : incoming_groups) {
      groups_.push_back(std::move(g));
      StartGroup(groups_.back().get());
    }
    const absl::Time now = absl::Now();
    auto should_drop = [&](Sequence* s) {
      if (s->finished) return true;
      if (std::find(cancels.begin(), cancels.end(), s->client_handle()) != cancels.end()) {
        FinishSeq(s, FinishReason::kCancelled, absl::CancelledError("cancelled by the client"));
        return true;
      }
      if (s->req.deadline < now) {
        FinishSeq(s, FinishReason::kCancelled, absl::DeadlineExceededError("deadline exceeded"));
        return true;
      }
      if (stopping && now >= drain_deadline) {
        FinishSeq(s, FinishReason::kCancelled, absl::OkStatus());
        return true;
      }
      return false;
    };
    // Marking first and sweeping after: finishing one sequence of a RAG group
    // finishes its siblings too.
    for (auto& s : running_) should_drop(s.get());
    for (auto& s : waiting_) should_drop(s.get());
    Sweep();
    if (stopping && running_.empty() && waiting_.empty()) {
      absl::MutexLock lock(&mu_);
      if (inbox_.empty() && group_inbox_.empty()) break;
      continue;
    }
    const bool stepped = Step();
    Sweep();
    if (!stepped && stopping) {
      // Nothing could be scheduled while draining: wait for the deadline.
      absl::SleepFor(absl::Milliseconds(1));
    }
  }
  groups_.clear();
  stat_running_ = 0;
  stat_waiting_ = 0;
}

void Engine::FreeBlocks(Sequence* seq) {
  for (BlockId b : seq->blocks) blocks_->Release(b);
  seq->blocks.clear();
  seq->block_hashes.clear();
  seq->computed = 0;
  seq->ll = rag::PathLikelihood();
}

void Engine::FinishSeq(Sequence* seq, FinishReason reason, absl::Status status) {
  if (seq->finished) return;
  seq->finished = true;
  FreeBlocks(seq);
  if (seq->internal() || (seq->group != nullptr && !status.ok())) {
    FailGroup(seq->group, reason, std::move(status));
    return;
  }
  StreamEvent ev;
  ev.finished = true;
  ev.finish_reason = reason;
  ev.status = status;
  if (status.ok() && seq->decoder != nullptr) {
    if (reason != FinishReason::kStop) {
      bool stopped = false;
      ev.text = seq->stop->Append(seq->decoder->Flush(), &stopped);
      ev.text += seq->stop->Flush();
    }
  }
  const absl::Time now = absl::Now();
  Usage& u = ev.usage;
  u.prompt_tokens = seq->prompt_len;
  u.generated_tokens = seq->generated;
  u.cached_prompt_tokens = seq->cached_prompt_tokens;
  u.queue_time_ms = seq->scheduled == absl::InfinitePast() ? Ms(now - seq->arrival)
                                                           : Ms(seq->scheduled - seq->arrival);
  u.ttft_ms = seq->first_token == absl::InfinitePast() ? 0 : Ms(seq->first_token - seq->arrival);
  u.total_time_ms = Ms(now - seq->arrival);
  if (seq->group != nullptr) {
    FillRagResult(seq->group, seq);
    const rag::Result& r = *seq->group->result;
    u.prompt_tokens = static_cast<int32_t>(rag::FlatSize(seq->group->spec()));
    u.cached_prompt_tokens = static_cast<int32_t>(r.prefix_cache_tokens + r.path_cache_tokens);
    u.queue_time_ms = Ms(seq->group->scheduled - seq->group->arrival);
    ev.rag = seq->group->result;
    ReleaseGroupBlocks(seq->group);
    seq->group->done = true;
  } else if (seq->req.rag != nullptr) {
    // A naive-mode RAG request: one flat prompt.
    auto r = std::make_shared<rag::Result>();
    r->mode = rag::Mode::kNaive;
    r->docs.resize(seq->req.rag->documents.size());
    r->prefix_cache_tokens = seq->cached_prompt_tokens;
    r->computed_tokens = seq->prompt_len - seq->cached_prompt_tokens;
    r->flops = {seq->flops, seq->flops};
    r->naive_flops = rag::NaiveFlops(flop_model_, seq->prompt_len, 0, seq->generated);
    ev.rag = r;
  }
  if (ev.rag != nullptr && status.ok() && observer_ != nullptr) observer_->OnRagFinished(*ev.rag);
  spdlog::info(
      "req={} finish={} status={} prompt_tokens={} cached_tokens={} new_tokens={} "
      "queue_ms={:.1f} ttft_ms={:.1f} total_ms={:.1f}",
      seq->log_id.str(), FinishReasonName(reason), absl::StatusCodeToString(status.code()),
      u.prompt_tokens, u.cached_prompt_tokens, u.generated_tokens, u.queue_time_ms, u.ttft_ms,
      u.total_time_ms);
  if (observer_ != nullptr) observer_->OnFinished(u, reason, status);
  seq->callback(std::move(ev));
  seq->callback = nullptr;
}

void Engine::Preempt(Sequence* seq) {
  FreeBlocks(seq);
  seq->prefix_checked = false;
  stat_preemptions_.fetch_add(1);
  if (observer_ != nullptr) observer_->OnPreempted();
  spdlog::debug("req={} preempted tokens={}", seq->log_id.str(), seq->tokens.size());
}

bool Engine::EnsureBlocks(Sequence* seq, int32_t upto_tokens) {
  const int32_t need = upto_tokens == 0 ? 0 : Storage(*seq, upto_tokens - 1) / block_size_ + 1;
  while (static_cast<int32_t>(seq->blocks.size()) < need) {
    std::optional<BlockId> b = blocks_->Allocate();
    if (!b) return false;
    seq->blocks.push_back(*b);
  }
  return true;
}

// Reuses cached full blocks of the prompt (same tenant, same preceding tokens). At
// least one prompt token is always computed, so that its logits exist.
void Engine::MatchPrefix(Sequence* seq) {
  seq->prefix_checked = true;
  if (!UsesPrefixCache(*seq)) return;
  if (!options_.prefix_caching || seq->computed != 0 || !seq->blocks.empty()) return;
  uint64_t h = HashString(0x5eed, seq->req.tenant);
  const int32_t n = static_cast<int32_t>(seq->tokens.size());
  int32_t matched = 0;
  while (matched + block_size_ < n) {
    h = HashBlock(h, seq->tokens.data() + matched, block_size_);
    std::optional<BlockId> b = blocks_->Lookup(h);
    if (!b) break;
    seq->blocks.push_back(*b);
    seq->block_hashes.push_back(h);
    matched += block_size_;
  }
  seq->computed = matched;
  if (seq->generated == 0) seq->cached_prompt_tokens = std::min(matched, seq->prompt_len);
}

void Engine::PublishBlocks(Sequence* seq) {
  if (!options_.prefix_caching) return;
  if (!UsesPrefixCache(*seq)) return;
  const int32_t full = seq->computed / block_size_;
  while (static_cast<int32_t>(seq->block_hashes.size()) < full) {
    const int32_t i = static_cast<int32_t>(seq->block_hashes.size());
    const uint64_t parent = i == 0 ? HashString(0x5eed, seq->req.tenant) : seq->block_hashes[i - 1];
    const uint64_t h = HashBlock(parent, seq->tokens.data() + i * block_size_, block_size_);
    blocks_->Publish(seq->blocks[i], h);
    seq->block_hashes.push_back(h);
  }
}

bool Engine::Step() {
  int32_t budget = options_.max_batch_tokens;
  struct Scheduled {
    Sequence* seq;
    int32_t num_tokens;
  };
  std::vector<Scheduled> sched;

  // 1. Running sequences, oldest first: one decode token or the next prefill chunk.
  //    When blocks run out, the newest running sequence is preempted.
  for (size_t i = 0; i < running_.size() && budget > 0;) {
    Sequence* seq = running_[i].get();
    const int32_t remaining = static_cast<int32_t>(seq->tokens.size()) - seq->computed;
    const int32_t n = std::min(remaining, budget);
    if (EnsureBlocks(seq, seq->computed + n)) {
      sched.push_back({seq, n});
      budget -= n;
      ++i;
      continue;
    }
    // Out of blocks: preempt the newest running sequence (possibly this one). A
    // sequence alone in the batch that does not fit the pool can never run.
    std::unique_ptr<Sequence> victim = std::move(running_.back());
    running_.pop_back();
    if (running_.empty()) {
      FinishSeq(victim.get(), FinishReason::kNone,
                absl::ResourceExhaustedError("the KV cache cannot hold this sequence"));
      break;
    }
    if (victim.get() != seq) {
      // It may already be scheduled this step: unschedule it.
      sched.erase(std::remove_if(sched.begin(), sched.end(),
                                 [&](const Scheduled& s) { return s.seq == victim.get(); }),
                  sched.end());
    }
    Preempt(victim.get());
    waiting_.push_front(std::move(victim));
    // Retry the same index (it now holds the same sequence unless it was the victim).
  }
  // The budget of a victim that was already scheduled is not returned this step.

  // 2. Admit waiting sequences while the budget, the batch size and the blocks last.
  while (!waiting_.empty() && budget > 0 &&
         static_cast<int32_t>(running_.size()) < options_.max_running) {
    Sequence* seq = waiting_.front().get();
    if (seq->finished) {  // a sibling of a failed RAG group
      waiting_.pop_front();
      continue;
    }
    if (!seq->prefix_checked) MatchPrefix(seq);
    const int32_t remaining = static_cast<int32_t>(seq->tokens.size()) - seq->computed;
    const int32_t n = std::min(remaining, budget);
    if (!EnsureBlocks(seq, seq->computed + n)) {
      // A waiting sequence holds no blocks (nor prefix-cache references) while it waits.
      FreeBlocks(seq);
      seq->prefix_checked = false;
      seq->cached_prompt_tokens = 0;
      if (!running_.empty()) break;  // FCFS: wait for blocks to be freed
      std::unique_ptr<Sequence> dead = std::move(waiting_.front());
      waiting_.pop_front();
      FinishSeq(dead.get(), FinishReason::kNone,
                absl::ResourceExhaustedError("the KV cache cannot hold this prompt"));
      continue;
    }
    if (seq->scheduled == absl::InfinitePast()) seq->scheduled = absl::Now();
    if (seq->group != nullptr && seq->group->scheduled == absl::InfinitePast()) {
      seq->group->scheduled = seq->scheduled;
    }
    sched.push_back({seq, n});
    budget -= n;
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
  }
  PublishCounts();
  if (sched.empty()) return false;

  // 3. Build the plan.
  BatchPlan plan;
  std::vector<int32_t> logits_row(sched.size(), -1);
  std::vector<int32_t> lp_begin(sched.size() + 1, 0);
  for (size_t k = 0; k < sched.size(); ++k) {
    Sequence* seq = sched[k].seq;
    SeqPlan sp;
    sp.id = static_cast<SeqId>(seq->handle);
    sp.context = seq->ctx;
    AppendOwnSegments(*seq, seq->computed, &sp.context);
    sp.token_begin = plan.num_tokens();
    sp.num_tokens = sched[k].num_tokens;
    const int32_t total = static_cast<int32_t>(seq->tokens.size());
    lp_begin[k] = static_cast<int32_t>(plan.logprobs.size());
    for (int32_t j = 0; j < sched[k].num_tokens; ++j) {
      const int32_t i = seq->computed + j;
      const int32_t st = Storage(*seq, i);
      plan.tokens.push_back(seq->tokens[i]);
      plan.positions.push_back(seq->PositionOf(i));
      plan.kv_slots.push_back({seq->blocks[st / block_size_], st % block_size_});
      // A path scores every within-segment next-token prediction of its document and
      // query (a segment's first token is not predicted from the segment).
      if (seq->role == SeqRole::kPath && i + 1 < total && i + 1 != seq->doc_len) {
        plan.logprobs.push_back({plan.num_tokens() - 1, seq->tokens[i + 1]});
      }
    }
    const bool complete = seq->computed + sched[k].num_tokens == total;
    const bool wants_logits = seq->role == SeqRole::kGenerate || seq->role == SeqRole::kAnswer ||
                              (seq->role == SeqRole::kPath && seq->group->spec().postamble.empty());
    if (complete && wants_logits) {
      logits_row[k] = static_cast<int32_t>(plan.logits_for.size());
      plan.logits_for.push_back(plan.num_tokens() - 1);
      const bool emits = seq->role == SeqRole::kGenerate || seq->role == SeqRole::kAnswer;
      RowSampling rs;
      int32_t top = 0;
      if (emits && options_.compact_logits) {
        const SamplingOptions& so = seq->req.sampling;
        const int32_t lp_top =
            seq->req.logprobs ? std::min(std::max(1, seq->req.top_logprobs), config_.vocab_size)
                              : 0;
        if (backend_->SamplesRows() && BackendCanSample(so, config_.vocab_size) &&
            lp_top <= kMaxTopLogits) {
          // The backend draws the token (draw index = tokens generated so far, so that
          // a recomputed sequence draws the same); the compact row is for logprobs.
          rs = RowSampling{so.temperature, so.top_p, so.min_p, so.seed, seq->generated};
          top = lp_top;
        } else {
          top = TopLogitsNeeded(so, seq->req.logprobs, seq->req.top_logprobs, config_.vocab_size);
        }
      }
      plan.logits_top.push_back(top);
      plan.sampling.push_back(rs);
    }
    // FLOPs of this step for this sequence: rows with logits or log-probabilities pay
    // for the LM head.
    const int32_t lm_rows =
        static_cast<int32_t>(plan.logprobs.size()) - lp_begin[k] + (logits_row[k] >= 0 ? 1 : 0);
    seq->flops +=
        flop_model_.Segment(seq->ctx_tokens + seq->computed, sched[k].num_tokens, lm_rows);
    plan.seqs.push_back(std::move(sp));
  }
  lp_begin[sched.size()] = static_cast<int32_t>(plan.logprobs.size());

  // 4. Run it.
  ForwardOutput out;
  absl::Status st = backend_->Forward(plan, &out);
  stat_steps_.fetch_add(1);
  if (observer_ != nullptr) {
    observer_->OnStep(static_cast<int32_t>(running_.size()), static_cast<int32_t>(waiting_.size()),
                      plan.num_tokens());
  }
  if (!st.ok()) {
    spdlog::error("forward failed: {}", st.ToString());
    const absl::Status err = absl::InternalError(absl::StrCat("backend failure: ", st.message()));
    for (const Scheduled& s : sched) FinishSeq(s.seq, FinishReason::kNone, err);
    return true;
  }

  // 5. Sample and stream; advance RAG groups.
  const int32_t V = config_.vocab_size;
  std::vector<Sampled> presampled(sched.size());
  // Where each logits row is in the output: a whole row's index in out.logits, or a
  // compact row's first token in out.top and its index in out.top_lse.
  // A sampled row's index in out.sampled.
  struct RowAt {
    int64_t whole = -1, top = 0, lse = -1, sampled = -1;
  };
  std::vector<RowAt> row_at(plan.logits_for.size());
  {
    int64_t whole = 0, top = 0, lse = 0, sampled = 0;
    for (size_t r = 0; r < row_at.size(); ++r) {
      const int32_t n = plan.logits_top[r];
      const bool by_backend = plan.sampling[r].temperature > 0.0f;
      if (by_backend) row_at[r].sampled = sampled++;
      if (n > 0) {
        row_at[r].top = top;
        row_at[r].lse = lse++;
        top += n;
      } else if (!by_backend) {
        row_at[r].whole = whole++;
      }
    }
    if (static_cast<size_t>(whole) * V != out.logits.size() ||
        static_cast<size_t>(top) != out.top.size() ||
        static_cast<size_t>(lse) != out.top_lse.size() ||
        static_cast<size_t>(sampled) != out.sampled.size() ||
        static_cast<size_t>(sampled) != out.sampled_logit.size()) {
      spdlog::error("forward returned logits of the wrong shape");
      const absl::Status err = absl::InternalError("backend failure: logits of the wrong shape");
      for (const Scheduled& s : sched) FinishSeq(s.seq, FinishReason::kNone, err);
      return true;
    }
  }
  // Whole rows are sampled in parallel first (a sampled row of a large vocabulary is
  // tens to hundreds of microseconds; each sequence has its own sampler and generator,
  // so the tokens do not depend on the threads). Streaming stays in order below.
  {
    std::vector<size_t> whole_rows;
    for (size_t k = 0; k < sched.size(); ++k) {
      Sequence* seq = sched[k].seq;
      const bool emits = seq->role == SeqRole::kGenerate || seq->role == SeqRole::kAnswer;
      if (!emits || seq->finished || logits_row[k] < 0 || row_at[logits_row[k]].whole < 0 ||
          seq->computed + sched[k].num_tokens < static_cast<int32_t>(seq->tokens.size())) {
        continue;
      }
      EnsureStreamState(seq);
      whole_rows.push_back(k);
    }
    const int64_t n = static_cast<int64_t>(whole_rows.size());
#pragma omp parallel for schedule(dynamic, 1) if (n > 1)
    for (int64_t i = 0; i < n; ++i) {
      thread_local std::vector<float> scratch;
      const size_t k = whole_rows[i];
      const float* row = out.logits.data() + static_cast<size_t>(row_at[logits_row[k]].whole) * V;
      presampled[k] = SampleNext(sched[k].seq, row, {}, 0.0f, &scratch);
    }
  }
  for (size_t k = 0; k < sched.size(); ++k) {
    Sequence* seq = sched[k].seq;
    if (seq->finished) continue;  // its RAG group failed earlier in this loop
    const int32_t first = seq->computed;
    seq->computed += sched[k].num_tokens;
    PublishBlocks(seq);
    if (seq->role == SeqRole::kPath) {
      for (int32_t r = lp_begin[k]; r < lp_begin[k + 1]; ++r) {
        const int32_t i = first + (plan.logprobs[r].token_index - plan.seqs[k].token_begin);
        if (i + 1 < seq->doc_len) {
          seq->ll.doc_sum += out.logprobs[r];
          ++seq->ll.doc_count;
        } else {
          seq->ll.query_sum += out.logprobs[r];
          ++seq->ll.query_count;
        }
      }
    }
    if (seq->computed < static_cast<int32_t>(seq->tokens.size())) continue;
    const RowAt* at = logits_row[k] >= 0 ? &row_at[logits_row[k]] : nullptr;
    const float* logits = at != nullptr && at->whole >= 0
                              ? out.logits.data() + static_cast<size_t>(at->whole) * V
                              : nullptr;
    switch (seq->role) {
      case SeqRole::kGenerate:
      case SeqRole::kAnswer:
        if (presampled[k].token >= 0) {
          EmitSampled(seq, std::move(presampled[k]));
        } else if (at != nullptr && at->sampled >= 0) {  // drawn by the backend
          EnsureStreamState(seq);
          Sampled drawn;
          drawn.token = out.sampled[at->sampled];
          if (seq->req.logprobs) {
            const float lse = out.top_lse[at->lse];
            TokenLogprobs lp = LogprobsFromTop(
                absl::MakeConstSpan(out.top).subspan(at->top, plan.logits_top[logits_row[k]]), lse,
                drawn.token, seq->req.top_logprobs);
            lp.chosen = {drawn.token, out.sampled_logit[at->sampled] - lse};
            drawn.logprobs.push_back(std::move(lp));
          }
          EmitSampled(seq, std::move(drawn));
        } else if (logits != nullptr) {
          EmitToken(seq, logits);
        } else {
          EmitToken(seq, nullptr,
                    absl::MakeConstSpan(out.top).subspan(at->top, plan.logits_top[logits_row[k]]),
                    out.top_lse[at->lse]);
        }
        break;
      case SeqRole::kPreamble:
        OnPreambleDone(seq);
        break;
      case SeqRole::kPath:
        OnPathDone(seq, logits);
        break;
    }
  }
  return true;
}

void Engine::EnsureStreamState(Sequence* seq) {
  if (seq->sampler) return;
  seq->sampler = std::make_unique<Sampler>(seq->req.sampling, seq->req.prompt_ids);
  seq->decoder =
      std::make_unique<DecodeStream>(tokenizer_, seq->req.prompt_ids, seq->req.skip_special_tokens);
  seq->stop = std::make_unique<StopChecker>(seq->req.stop);
}

Engine::Sampled Engine::SampleNext(Sequence* seq, const float* logits_in,
                                   absl::Span<const TopLogit> top, float top_lse,
                                   std::vector<float>* scratch) const {
  const int32_t V = config_.vocab_size;
  Sampled out;
  if (logits_in != nullptr) {
    scratch->assign(logits_in, logits_in + V);  // the penalties write into it
    out.token = seq->sampler->Sample(absl::MakeSpan(*scratch));
    if (seq->req.logprobs) {
      out.logprobs.push_back(
          ComputeLogprobs(absl::MakeConstSpan(logits_in, V), out.token, seq->req.top_logprobs));
    }
  } else {
    out.token = seq->sampler->SampleTop(top);
    if (seq->req.logprobs) {
      out.logprobs.push_back(LogprobsFromTop(top, top_lse, out.token, seq->req.top_logprobs));
    }
  }
  return out;
}

// Samples the next token of `seq` from its logits and streams it; finishes the
// sequence when a stop condition holds.
void Engine::EmitToken(Sequence* seq, const float* logits_in, absl::Span<const TopLogit> top,
                       float top_lse) {
  EnsureStreamState(seq);
  EmitSampled(seq, SampleNext(seq, logits_in, top, top_lse, &logits_scratch_));
}

void Engine::EmitSampled(Sequence* seq, Sampled sampled) {
  // A recomputed (preempted) sequence has already streamed its tokens: the logits of
  // its last token give the next one as usual.
  StreamEvent ev;
  const int32_t token = sampled.token;
  ev.logprobs = std::move(sampled.logprobs);
  seq->sampler->Accept(token);
  seq->tokens.push_back(token);
  ++seq->generated;
  const absl::Time now = absl::Now();
  if (seq->first_token == absl::InfinitePast()) {
    seq->first_token = now;
    if (observer_ != nullptr) {
      observer_->OnFirstToken(Ms(seq->scheduled - seq->arrival), Ms(now - seq->arrival));
    }
  } else if (observer_ != nullptr) {
    observer_->OnToken(Ms(now - seq->last_token));
  }
  seq->last_token = now;
  ev.token_ids.push_back(token);

  FinishReason reason = FinishReason::kNone;
  const bool is_eos = std::find(config_.eos_token_ids.begin(), config_.eos_token_ids.end(),
                                token) != config_.eos_token_ids.end();
  bool stopped = false;
  ev.text = seq->stop->Append(seq->decoder->Step(token), &stopped);
  if (stopped) {
    reason = FinishReason::kStop;
  } else if (std::find(seq->req.stop_token_ids.begin(), seq->req.stop_token_ids.end(), token) !=
             seq->req.stop_token_ids.end()) {
    reason = FinishReason::kStop;
  } else if (is_eos && !seq->req.ignore_eos) {
    reason = FinishReason::kEos;
  } else if (seq->generated >= seq->req.sampling.max_new_tokens ||
             seq->PositionOf(static_cast<int32_t>(seq->tokens.size())) >= max_context_) {
    reason = FinishReason::kLength;
  }
  if (reason == FinishReason::kNone) {
    seq->callback(std::move(ev));
    return;
  }
  // Send this token's delta, then the final event (which flushes held-back text).
  seq->callback(std::move(ev));
  FinishSeq(seq, reason, absl::OkStatus());
}

}  // namespace superpose::engine
