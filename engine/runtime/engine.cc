#include "engine/runtime/engine.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "engine/runtime/sampler.h"
#include "engine/runtime/stop_checker.h"
#include "spdlog/spdlog.h"

namespace superpose::engine {

struct Engine::Sequence {
  uint64_t handle = 0;
  Request req;
  StreamCallback callback;
  std::vector<int32_t> tokens;  // prompt, then generated tokens
  int32_t prompt_len = 0;
  int32_t computed = 0;         // tokens whose K/V are in `blocks`
  int32_t generated = 0;
  int32_t cached_prompt_tokens = 0;
  std::vector<BlockId> blocks;
  std::vector<uint64_t> block_hashes;  // chained hashes of the full blocks published so far
  bool prefix_checked = false;
  std::unique_ptr<Sampler> sampler;
  std::unique_ptr<DecodeStream> decoder;
  std::unique_ptr<StopChecker> stop;
  absl::Time arrival;
  absl::Time scheduled = absl::InfinitePast();
  absl::Time first_token = absl::InfinitePast();
  absl::Time last_token = absl::InfinitePast();
  bool cancelled = false;
};

namespace {
double Ms(absl::Duration d) { return absl::ToDoubleMilliseconds(d); }
}  // namespace

Engine::Engine(const EngineOptions& options, const ModelConfig& config, const Tokenizer* tokenizer,
               Backend* backend)
    : options_(options), config_(config), tokenizer_(tokenizer), backend_(backend) {
  const KvPoolInfo kv = backend_->kv();
  block_size_ = kv.block_size;
  blocks_ = std::make_unique<KvBlockManager>(kv.num_blocks);
  max_context_ = config.max_position_embeddings;
  if (options_.max_context > 0) max_context_ = std::min(max_context_, options_.max_context);
  options_.max_batch_tokens = std::max(1, options_.max_batch_tokens);
  options_.max_running = std::max(1, options_.max_running);
}

Engine::~Engine() { Shutdown(absl::ZeroDuration()); }

void Engine::Start() { thread_ = std::thread([this] { Loop(); }); }

absl::StatusOr<uint64_t> Engine::Submit(Request request, StreamCallback callback) {
  auto seq = std::make_unique<Sequence>();
  seq->arrival = absl::Now();
  seq->tokens = request.prompt_ids;
  seq->prompt_len = static_cast<int32_t>(request.prompt_ids.size());
  seq->req = std::move(request);
  seq->callback = std::move(callback);
  if (seq->prompt_len == 0) return absl::InvalidArgumentError("prompt is empty");
  if (seq->prompt_len >= max_context_) {
    return absl::InvalidArgumentError(absl::StrCat("prompt has ", seq->prompt_len,
                                                   " tokens; the context window is ",
                                                   max_context_));
  }
  absl::MutexLock lock(&mu_);
  if (!accepting_) return absl::UnavailableError("server is shutting down");
  if (queued_ >= options_.max_waiting) {
    return absl::ResourceExhaustedError(
        absl::StrCat("waiting queue is full (", options_.max_waiting, " requests)"));
  }
  seq->handle = next_handle_++;
  const uint64_t handle = seq->handle;
  ++queued_;
  inbox_.push_back(std::move(seq));
  cv_.Signal();
  return handle;
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
  return s;
}

void Engine::Loop() {
  while (true) {
    std::vector<std::unique_ptr<Sequence>> incoming;
    std::vector<uint64_t> cancels;
    bool stopping;
    absl::Time drain_deadline;
    {
      absl::MutexLock lock(&mu_);
      while (inbox_.empty() && cancels_.empty() && !stop_ && running_.empty() &&
             waiting_.empty()) {
        cv_.Wait(&mu_);
      }
      incoming.swap(inbox_);
      cancels.swap(cancels_);
      stopping = stop_;
      drain_deadline = drain_deadline_;
    }
    for (auto& seq : incoming) {
      // Priority order among waiting requests; FCFS within a priority.
      auto it = std::find_if(waiting_.begin(), waiting_.end(), [&](const auto& w) {
        return w->req.priority < seq->req.priority;
      });
      waiting_.insert(it, std::move(seq));
    }
    const absl::Time now = absl::Now();
    auto should_drop = [&](Sequence* s) {
      if (std::find(cancels.begin(), cancels.end(), s->handle) != cancels.end()) {
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
    running_.erase(std::remove_if(running_.begin(), running_.end(),
                                  [&](auto& s) { return should_drop(s.get()); }),
                   running_.end());
    const size_t before = waiting_.size();
    waiting_.erase(std::remove_if(waiting_.begin(), waiting_.end(),
                                  [&](auto& s) { return should_drop(s.get()); }),
                   waiting_.end());
    if (waiting_.size() != before) {
      absl::MutexLock lock(&mu_);
      queued_ -= static_cast<int32_t>(before - waiting_.size());
    }
    stat_running_ = static_cast<int32_t>(running_.size());
    stat_waiting_ = static_cast<int32_t>(waiting_.size());
    if (stopping && running_.empty() && waiting_.empty()) {
      absl::MutexLock lock(&mu_);
      if (inbox_.empty()) break;
      continue;
    }
    if (!Step() && stopping) {
      // Nothing could be scheduled while draining: wait for the deadline.
      absl::SleepFor(absl::Milliseconds(1));
    }
  }
  stat_running_ = 0;
  stat_waiting_ = 0;
}

void Engine::FreeBlocks(Sequence* seq) {
  for (BlockId b : seq->blocks) blocks_->Release(b);
  seq->blocks.clear();
  seq->block_hashes.clear();
  seq->computed = 0;
}

void Engine::FinishSeq(Sequence* seq, FinishReason reason, absl::Status status) {
  FreeBlocks(seq);
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
  spdlog::info("req={} finish={} status={} prompt_tokens={} cached_tokens={} new_tokens={} "
               "queue_ms={:.1f} ttft_ms={:.1f} total_ms={:.1f}",
               seq->req.request_id, FinishReasonName(reason),
               absl::StatusCodeToString(status.code()), u.prompt_tokens, u.cached_prompt_tokens,
               u.generated_tokens, u.queue_time_ms, u.ttft_ms, u.total_time_ms);
  if (observer_ != nullptr) observer_->OnFinished(u, reason, status);
  seq->callback(std::move(ev));
  seq->callback = nullptr;
}

void Engine::Preempt(Sequence* seq) {
  FreeBlocks(seq);
  seq->prefix_checked = false;
  stat_preemptions_.fetch_add(1);
  if (observer_ != nullptr) observer_->OnPreempted();
  spdlog::debug("req={} preempted tokens={}", seq->req.request_id, seq->tokens.size());
}

bool Engine::EnsureBlocks(Sequence* seq, int32_t upto_tokens) {
  const int32_t need = (upto_tokens + block_size_ - 1) / block_size_;
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
  const int32_t full = seq->computed / block_size_;
  while (static_cast<int32_t>(seq->block_hashes.size()) < full) {
    const int32_t i = static_cast<int32_t>(seq->block_hashes.size());
    const uint64_t parent =
        i == 0 ? HashString(0x5eed, seq->req.tenant) : seq->block_hashes[i - 1];
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
    {
      absl::MutexLock lock(&mu_);
      ++queued_;
    }
    // Retry the same index (it now holds the same sequence unless it was the victim).
  }
  // The budget of a victim that was already scheduled is not returned this step.

  // 2. Admit waiting sequences while the budget, the batch size and the blocks last.
  while (!waiting_.empty() && budget > 0 &&
         static_cast<int32_t>(running_.size()) < options_.max_running) {
    Sequence* seq = waiting_.front().get();
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
      {
        absl::MutexLock lock(&mu_);
        --queued_;
      }
      FinishSeq(dead.get(), FinishReason::kNone,
                absl::ResourceExhaustedError("the KV cache cannot hold this prompt"));
      continue;
    }
    if (seq->scheduled == absl::InfinitePast()) seq->scheduled = absl::Now();
    sched.push_back({seq, n});
    budget -= n;
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
    absl::MutexLock lock(&mu_);
    --queued_;
  }
  stat_running_ = static_cast<int32_t>(running_.size());
  stat_waiting_ = static_cast<int32_t>(waiting_.size());
  if (sched.empty()) return false;

  // 3. Build the plan.
  BatchPlan plan;
  std::vector<int32_t> logits_row(sched.size(), -1);
  for (size_t k = 0; k < sched.size(); ++k) {
    Sequence* seq = sched[k].seq;
    SeqPlan sp;
    sp.id = static_cast<SeqId>(seq->handle);
    for (int32_t b = 0, done = 0; done < seq->computed; ++b) {
      const int32_t len = std::min(block_size_, seq->computed - done);
      sp.context.push_back({seq->blocks[b], 0, len});
      done += len;
    }
    sp.token_begin = plan.num_tokens();
    sp.num_tokens = sched[k].num_tokens;
    for (int32_t j = 0; j < sched[k].num_tokens; ++j) {
      const int32_t pos = seq->computed + j;
      plan.tokens.push_back(seq->tokens[pos]);
      plan.positions.push_back(static_cast<float>(pos));
      plan.kv_slots.push_back({seq->blocks[pos / block_size_], pos % block_size_});
    }
    if (seq->computed + sched[k].num_tokens == static_cast<int32_t>(seq->tokens.size())) {
      logits_row[k] = static_cast<int32_t>(plan.logits_for.size());
      plan.logits_for.push_back(plan.num_tokens() - 1);
    }
    plan.seqs.push_back(std::move(sp));
  }

  // 4. Run it.
  ForwardOutput out;
  absl::Status st = backend_->Forward(plan, &out);
  stat_steps_.fetch_add(1);
  if (observer_ != nullptr) {
    observer_->OnStep(static_cast<int32_t>(running_.size()),
                      static_cast<int32_t>(waiting_.size()), plan.num_tokens());
  }
  if (!st.ok()) {
    spdlog::error("forward failed: {}", st.ToString());
    for (const Scheduled& s : sched) s.seq->cancelled = true;
    const absl::Status err = absl::InternalError(absl::StrCat("backend failure: ", st.message()));
    running_.erase(std::remove_if(running_.begin(), running_.end(),
                                  [&](auto& s) {
                                    if (!s->cancelled) return false;
                                    FinishSeq(s.get(), FinishReason::kNone, err);
                                    return true;
                                  }),
                   running_.end());
    return true;
  }

  // 5. Sample and stream.
  const int32_t V = config_.vocab_size;
  for (size_t k = 0; k < sched.size(); ++k) {
    Sequence* seq = sched[k].seq;
    seq->computed += sched[k].num_tokens;
    PublishBlocks(seq);
    if (logits_row[k] < 0) continue;
    EmitToken(seq, out.logits.data() + static_cast<size_t>(logits_row[k]) * V);
  }
  running_.erase(std::remove_if(running_.begin(), running_.end(),
                                [](auto& s) { return s->callback == nullptr; }),
                 running_.end());
  stat_running_ = static_cast<int32_t>(running_.size());
  stat_waiting_ = static_cast<int32_t>(waiting_.size());
  return true;
}

// Samples the next token of `seq` from its logits and streams it; finishes the
// sequence when a stop condition holds.
void Engine::EmitToken(Sequence* seq, const float* logits_in) {
  const int32_t V = config_.vocab_size;
  std::vector<float> logits(logits_in, logits_in + V);
  if (!seq->sampler) {
    seq->sampler = std::make_unique<Sampler>(seq->req.sampling, seq->req.prompt_ids);
    seq->decoder = std::make_unique<DecodeStream>(tokenizer_, seq->req.prompt_ids,
                                                  seq->req.skip_special_tokens);
    seq->stop = std::make_unique<StopChecker>(seq->req.stop);
  }
  // A recomputed (preempted) sequence has already streamed its tokens: the logits of
  // its last token give the next one as usual.
  StreamEvent ev;
  const int32_t token = seq->sampler->Sample(absl::MakeSpan(logits));
  if (seq->req.logprobs) {
    ev.logprobs.push_back(ComputeLogprobs(absl::MakeConstSpan(logits_in, V), token,
                                          seq->req.top_logprobs));
  }
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
             static_cast<int32_t>(seq->tokens.size()) >= max_context_) {
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
