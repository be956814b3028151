#include "engine/rag/planner.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "engine/kv/kv_block_manager.h"
#include "spdlog/spdlog.h"

namespace superpose::engine::rag {
namespace {

double Ms(absl::Duration d) { return absl::ToDoubleMilliseconds(d); }

// Segments covering the first `n` tokens stored contiguously from slot 0 of `blocks`.
void AppendBlockSegments(const std::vector<BlockId>& blocks, int32_t n, int32_t block_size,
                         std::vector<KvSegment>* out) {
  for (int32_t b = 0, done = 0; done < n; ++b) {
    const int32_t len = std::min(block_size, n - done);
    out->push_back({blocks[b], 0, len});
    done += len;
  }
}

struct PreparedLayout final : Prepared {
  Layout layout;
};

}  // namespace

struct Planner::Path {
  uint64_t key = 0;
  bool cached = false;
  int32_t own_doc_len = 0;  // document tokens the path sequence computes (0 when cached)
  std::vector<BlockId> doc_blocks;
  std::vector<BlockId> query_blocks;
  PathLikelihood ll;
  double score = 0;
  bool kept = false;
  double flops = 0;
  std::vector<float> last_logits;  // without a postamble: the first answer token's row
};

struct Planner::Group {
  uint64_t handle = 0;
  LogId log_id;
  Request req;  // req.rag holds the spec
  StreamCallback callback;
  Layout layout;
  absl::Time arrival;
  absl::Time scheduled = absl::InfinitePast();

  std::vector<BlockId> preamble_blocks;
  int32_t preamble_len = 0;
  int32_t prefix_cached = 0;
  double preamble_flops = 0;
  std::vector<Path> paths;
  int32_t pending = 0;
  std::vector<Sequence*> live;  // its sequences the engine still runs

  const Spec& spec() const { return *req.rag; }
  uint64_t PreambleKey() const {
    return PathCache::Key(req.tenant, req.adapter_key(), spec().preamble, {}, -1.0f, 0.0f);
  }
};

Planner::Planner(SequenceHost* host, const ModelConfig& config, const Limits& limits)
    : host_(host),
      vocab_(config.vocab_size),
      limits_(limits),
      flop_model_(config),
      path_cache_(&host->blocks()) {}

Planner::~Planner() = default;

absl::StatusOr<std::unique_ptr<Prepared>> Planner::Validate(const Request& request) const {
  absl::StatusOr<Checked> checked = rag::Validate(*request.rag, limits_);
  if (!checked.ok()) return checked.status();
  auto p = std::make_unique<PreparedLayout>();
  p->layout = std::move(checked->layout);
  return p;
}

std::unique_ptr<Sequence> Planner::NewSequence(Group* g, int32_t role) {
  auto seq = std::make_unique<Sequence>();
  seq->handle = host_->NewHandle();
  seq->client_handle = g->handle;
  seq->log_id = g->log_id;
  seq->req.tenant = g->req.tenant;
  seq->req.deadline = g->req.deadline;
  seq->req.priority = g->req.priority;
  seq->req.adapter = g->req.adapter;  // every sequence of the request runs its adapter
  seq->arrival = g->arrival;
  seq->owner = this;
  seq->owner_key = g->handle;
  seq->owner_index = role;
  seq->counts_as_request = role == kPreamble;
  g->live.push_back(seq.get());
  return seq;
}

void Planner::Forget(Group* g, Sequence* seq) {
  g->live.erase(std::remove(g->live.begin(), g->live.end(), seq), g->live.end());
}

void Planner::Start(PendingRequest p) {
  if (p.req.rag->options.mode == Mode::kNaive) {
    StartNaive(std::move(p));
    return;
  }
  auto owned = std::make_unique<Group>();
  Group* g = owned.get();
  g->handle = p.handle;
  g->log_id = p.log_id;
  g->req = std::move(p.req);
  g->callback = std::move(p.callback);
  g->arrival = p.arrival;
  g->layout = static_cast<PreparedLayout&>(*p.prepared).layout;
  groups_[g->handle] = std::move(owned);
  const Spec& spec = g->spec();
  g->paths.resize(spec.documents.size());
  spdlog::info(
      "req={} rag documents={} preamble_tokens={} query_tokens={} postamble_tokens={} top_k={}",
      g->log_id.str(), spec.documents.size(), spec.preamble.size(), spec.query.size(),
      spec.postamble.size(), spec.options.top_k);
  if (spec.preamble.empty()) return StartPaths(g);
  // With the path cache on, the whole preamble (its partial last block too) is a cache
  // entry of its own: the ancestor of every document entry.
  if (spec.options.path_cache) {
    const int32_t bs = host_->block_size();
    const int32_t nb = (static_cast<int32_t>(spec.preamble.size()) + bs - 1) / bs;
    if (auto hit = path_cache_.Lookup(g->PreambleKey(), nb)) {
      g->preamble_blocks = std::move(hit->blocks);
      g->preamble_len = static_cast<int32_t>(spec.preamble.size());
      g->prefix_cached = g->preamble_len;
      return StartPaths(g);
    }
  }
  auto seq = NewSequence(g, kPreamble);
  seq->tokens = spec.preamble;
  seq->prompt_len = static_cast<int32_t>(seq->tokens.size());
  seq->prefix_cache = !spec.options.path_cache;
  std::vector<std::unique_ptr<Sequence>> one;
  one.push_back(std::move(seq));
  host_->Enqueue(std::move(one), /*front=*/false);
}

void Planner::StartNaive(PendingRequest p) {
  auto seq = std::make_unique<Sequence>();
  seq->handle = p.handle;
  seq->client_handle = p.handle;
  seq->log_id = p.log_id;
  seq->arrival = p.arrival;
  seq->req = std::move(p.req);
  seq->req.prompt_ids = Flatten(*seq->req.rag);
  seq->tokens = seq->req.prompt_ids;
  seq->prompt_len = static_cast<int32_t>(seq->tokens.size());
  seq->callback = std::move(p.callback);
  seq->owner = this;
  seq->owner_index = kNaive;
  seq->emits = true;
  seq->prefix_cache = true;
  host_->StartLazy(seq.get());
  std::vector<std::unique_ptr<Sequence>> one;
  one.push_back(std::move(seq));
  host_->Enqueue(std::move(one), /*front=*/false);
}

void Planner::StartPaths(Group* g) {
  const Spec& spec = g->spec();
  const int32_t n = static_cast<int32_t>(spec.documents.size());
  const int32_t bs = host_->block_size();
  std::vector<KvSegment> preamble_ctx;
  AppendBlockSegments(g->preamble_blocks, g->preamble_len, bs, &preamble_ctx);
  std::vector<float> query_pos(spec.query.size());
  for (size_t j = 0; j < query_pos.size(); ++j) query_pos[j] = g->layout.query_start + j;

  std::vector<std::unique_ptr<Sequence>> seqs;
  for (int32_t i = 0; i < n; ++i) {
    const std::vector<int32_t>& doc = spec.documents[i];
    Path& path = g->paths[i];
    path.key = PathCache::Key(g->req.tenant, g->req.adapter_key(), spec.preamble, doc,
                              g->layout.doc_start[i], g->layout.doc_step[i]);
    const int32_t doc_len = static_cast<int32_t>(doc.size());
    if (spec.options.path_cache) {
      if (std::optional<PathCache::Entry> hit =
              path_cache_.Lookup(path.key, (doc_len + bs - 1) / bs)) {
        path.cached = true;
        path.doc_blocks = std::move(hit->blocks);
        path.ll.doc_sum = hit->doc_sum;
        path.ll.doc_count = hit->doc_count;
        hits_.fetch_add(1);
      } else {
        misses_.fetch_add(1);
      }
    }
    auto seq = NewSequence(g, i);
    seq->scored = true;
    seq->wants_last_row = spec.postamble.empty();
    seq->ctx = preamble_ctx;
    seq->ctx_tokens = g->preamble_len;
    if (path.cached) {
      AppendBlockSegments(path.doc_blocks, doc_len, bs, &seq->ctx);
      seq->ctx_tokens += doc_len;
    } else {
      path.own_doc_len = doc_len;
      seq->tokens = doc;
      seq->segment_start = doc_len;
      seq->gap_at = doc_len;
      for (int32_t j = 0; j < doc_len; ++j) seq->pos.push_back(g->layout.DocPosition(i, j));
    }
    seq->tokens.insert(seq->tokens.end(), spec.query.begin(), spec.query.end());
    seq->pos.insert(seq->pos.end(), query_pos.begin(), query_pos.end());
    seq->pos_base = g->layout.postamble_start;
    seq->prompt_len = static_cast<int32_t>(seq->tokens.size());
    seqs.push_back(std::move(seq));
  }
  g->pending = n;
  // The paths of an admitted request go ahead of requests not yet started.
  host_->Enqueue(std::move(seqs), /*front=*/true);
}

void Planner::OnAdmitted(Sequence& seq) {
  auto it = groups_.find(seq.owner_key);
  if (seq.owner_index == kNaive || it == groups_.end()) return;
  if (it->second->scheduled == absl::InfinitePast()) it->second->scheduled = seq.scheduled;
}

bool Planner::RequestAdmitted(const Sequence& seq) const {
  auto it = groups_.find(seq.owner_key);
  if (seq.owner_index == kNaive || it == groups_.end()) {
    return seq.scheduled != absl::InfinitePast();
  }
  return it->second->scheduled != absl::InfinitePast();
}

// Path scores: log-likelihoods of the document's tokens, then of the query's.
void Planner::OnScore(Sequence& seq, int32_t target, float logprob) {
  auto it = groups_.find(seq.owner_key);
  if (it == groups_.end() || seq.owner_index < 0) return;
  Path& path = it->second->paths[seq.owner_index];
  PathLikelihood& ll = path.ll;
  if (target < path.own_doc_len) {
    ll.doc_sum += logprob;
    ++ll.doc_count;
  } else {
    ll.query_sum += logprob;
    ++ll.query_count;
  }
}

void Planner::OnPreempted(Sequence& seq) {
  auto it = groups_.find(seq.owner_key);
  if (it == groups_.end() || seq.owner_index < 0) return;
  Path& path = it->second->paths[seq.owner_index];
  // Computed again from its first token: so are its scores (a cached document's
  // log-likelihood stays).
  path.ll.query_sum = 0;
  path.ll.query_count = 0;
  if (!path.cached) {
    path.ll.doc_sum = 0;
    path.ll.doc_count = 0;
  }
}

void Planner::OnComputed(Sequence& seq, const float* row) {
  auto it = groups_.find(seq.owner_key);
  if (it == groups_.end()) return;
  Group* g = it->second.get();
  Forget(g, &seq);
  if (seq.owner_index == kPreamble) {
    OnPreambleDone(g, seq);
  } else if (seq.owner_index >= 0) {
    OnPathDone(g, seq, row);
  }
}

void Planner::OnPreambleDone(Group* g, Sequence& seq) {
  g->preamble_blocks = std::move(seq.blocks);
  seq.blocks.clear();
  seq.published_blocks = 0;
  g->preamble_len = seq.computed;
  g->prefix_cached = seq.cached_prompt_tokens;
  g->preamble_flops = seq.flops;
  if (g->spec().options.path_cache) {
    path_cache_.Insert(g->PreambleKey(), g->preamble_blocks, 0, 0);
  }
  StartPaths(g);
}

void Planner::OnPathDone(Group* g, Sequence& seq, const float* row) {
  Path& path = g->paths[seq.owner_index];
  if (!path.cached) {
    const int32_t bs = host_->block_size();
    const int32_t doc_blocks = (path.own_doc_len + bs - 1) / bs;
    path.doc_blocks.assign(seq.blocks.begin(), seq.blocks.begin() + doc_blocks);
    path.query_blocks.assign(seq.blocks.begin() + doc_blocks, seq.blocks.end());
    if (g->spec().options.path_cache) {
      path_cache_.Insert(path.key, path.doc_blocks, path.ll.doc_sum, path.ll.doc_count);
    }
  } else {
    path.query_blocks = seq.blocks;
  }
  seq.blocks.clear();
  seq.published_blocks = 0;
  path.flops = seq.flops;
  if (row != nullptr) path.last_logits.assign(row, row + vocab_);
  if (--g->pending == 0) Join(g);
}

void Planner::Join(Group* g) {
  const Spec& spec = g->spec();
  const int32_t n = static_cast<int32_t>(g->paths.size());
  const int32_t bs = host_->block_size();
  KvBlockManager& blocks = host_->blocks();
  std::vector<double> scores(n);
  for (int32_t i = 0; i < n; ++i) {
    g->paths[i].score = Saliency(g->paths[i].ll, spec.options.doc_weight);
    scores[i] = g->paths[i].score;
  }
  const std::vector<int32_t> kept = TopK(scores, spec.options.top_k);
  for (int32_t a : kept) g->paths[a].kept = true;
  // Pruning: the blocks of dropped paths go back now (cached documents stay findable).
  for (Path& path : g->paths) {
    if (path.kept) continue;
    for (BlockId b : path.doc_blocks) blocks.Release(b);
    for (BlockId b : path.query_blocks) blocks.Release(b);
    path.doc_blocks.clear();
    path.query_blocks.clear();
    path.last_logits.clear();
  }

  // The answer carries the whole request (sampling, stops) and the client's callback.
  std::unique_ptr<Sequence> answer = NewSequence(g, kAnswer);
  answer->req = g->req;
  answer->callback = g->callback;
  answer->emits = true;
  answer->scheduled = g->scheduled;
  AppendBlockSegments(g->preamble_blocks, g->preamble_len, bs, &answer->ctx);
  answer->ctx_tokens = g->preamble_len;
  // The sampler's and detokenizer's view of the prompt: p, kept documents, q, t.
  std::vector<int32_t> prompt = spec.preamble;
  const int32_t q = static_cast<int32_t>(spec.query.size());
  for (int32_t a : kept) {
    const int32_t doc_len = static_cast<int32_t>(spec.documents[a].size());
    AppendBlockSegments(g->paths[a].doc_blocks, doc_len, bs, &answer->ctx);
    AppendBlockSegments(g->paths[a].query_blocks, q, bs, &answer->ctx);
    answer->ctx_tokens += doc_len + q;
    prompt.insert(prompt.end(), spec.documents[a].begin(), spec.documents[a].end());
  }
  prompt.insert(prompt.end(), spec.query.begin(), spec.query.end());
  prompt.insert(prompt.end(), spec.postamble.begin(), spec.postamble.end());
  answer->req.prompt_ids = std::move(prompt);
  answer->tokens = spec.postamble;
  answer->prompt_len = static_cast<int32_t>(spec.postamble.size());
  for (size_t j = 0; j < spec.postamble.size(); ++j) {
    answer->pos.push_back(g->layout.postamble_start + j);
  }
  answer->pos_base = g->layout.answer_start;
  if (spec.postamble.empty()) {
    // No join segment: the first answer token comes from the last query token of the
    // highest-scoring kept path; later tokens attend to every kept path.
    int32_t best = kept[0];
    for (int32_t a : kept) {
      if (g->paths[a].score > g->paths[best].score) best = a;
    }
    const std::vector<float> row = std::move(g->paths[best].last_logits);
    for (Path& path : g->paths) path.last_logits.clear();
    host_->EmitFromRow(*answer, row.data());
    if (answer->finished) return;  // one token was all it needed (the group is gone)
  }
  std::vector<std::unique_ptr<Sequence>> one;
  one.push_back(std::move(answer));
  host_->Enqueue(std::move(one), /*front=*/true);
}

void Planner::ReleaseBlocks(Group* g) {
  KvBlockManager& blocks = host_->blocks();
  for (BlockId b : g->preamble_blocks) blocks.Release(b);
  g->preamble_blocks.clear();
  for (Path& path : g->paths) {
    for (BlockId b : path.doc_blocks) blocks.Release(b);
    for (BlockId b : path.query_blocks) blocks.Release(b);
    path.doc_blocks.clear();
    path.query_blocks.clear();
    path.last_logits.clear();
  }
}

bool Planner::OnFinished(Sequence& seq, FinishReason reason, const absl::Status& status,
                         StreamEvent* ev) {
  if (seq.owner_index == kNaive) {
    // One flat prompt: reported like a superposition request, without scores.
    auto r = std::make_shared<Result>();
    r->mode = Mode::kNaive;
    r->docs.resize(seq.req.rag->documents.size());
    r->prefix_cache_tokens = seq.cached_prompt_tokens;
    r->computed_tokens = seq.prompt_len - seq.cached_prompt_tokens;
    r->flops = {seq.flops, seq.flops};
    r->naive_flops = NaiveFlops(flop_model_, seq.prompt_len, 0, seq.generated);
    ev->rag = r;
    return true;
  }
  auto it = groups_.find(seq.owner_key);
  if (it == groups_.end()) return false;
  Group* g = it->second.get();
  Forget(g, &seq);
  if (seq.owner_index != kAnswer || !status.ok()) {
    Fail(g, reason, status);
    return false;
  }
  FillResult(g, seq, ev);
  ReleaseBlocks(g);
  groups_.erase(it);
  return true;
}

void Planner::Fail(Group* g, FinishReason reason, const absl::Status& status) {
  for (Sequence* s : g->live) host_->Drop(*s);
  g->live.clear();
  ReleaseBlocks(g);
  StreamEvent ev;
  ev.finished = true;
  ev.finish_reason = reason;
  ev.status = status;
  const absl::Time now = absl::Now();
  ev.usage.prompt_tokens = static_cast<int32_t>(FlatSize(g->spec()));
  ev.usage.queue_time_ms =
      Ms((g->scheduled == absl::InfinitePast() ? now : g->scheduled) - g->arrival);
  ev.usage.total_time_ms = Ms(now - g->arrival);
  // Ids, counts and timings only (LogId: a validated request id).
  spdlog::info("req={} handle={} rag finish={} status={} documents={} total_ms={:.1f}",
               g->log_id.str(), g->handle, FinishReasonName(reason),
               absl::StatusCodeToString(status.code()), g->paths.size(), ev.usage.total_time_ms);
  host_->Deliver(g->callback, std::move(ev));
  groups_.erase(g->handle);
}

void Planner::FillResult(Group* g, const Sequence& answer, StreamEvent* ev) {
  const Spec& spec = g->spec();
  auto r = std::make_shared<Result>();
  r->mode = Mode::kSuperposition;
  r->span = g->layout.span;
  r->prefix_cache_tokens = g->prefix_cached;
  r->computed_tokens = g->preamble_len - g->prefix_cached + answer.prompt_len;
  double longest_path = 0;
  double paths_total = 0;
  const int64_t q = static_cast<int64_t>(spec.query.size());
  for (size_t i = 0; i < g->paths.size(); ++i) {
    const Path& path = g->paths[i];
    const int64_t doc_len = static_cast<int64_t>(spec.documents[i].size());
    DocResult d;
    d.score = path.score;
    d.doc_ll = path.ll.DocMean();
    d.query_ll = path.ll.QueryMean();
    d.kept = path.kept;
    d.cached = path.cached;
    r->docs.push_back(d);
    r->computed_tokens += q + (path.cached ? 0 : doc_len);
    if (path.cached) r->path_cache_tokens += doc_len;
    if (!path.kept) r->pruned_tokens += doc_len + q;
    longest_path = std::max(longest_path, path.flops);
    paths_total += path.flops;
  }
  r->flops.total = g->preamble_flops + paths_total + answer.flops;
  r->flops.critical_path = g->preamble_flops + longest_path + answer.flops;
  r->naive_flops = NaiveFlops(flop_model_, FlatSize(spec), 0, answer.generated);
  Usage& u = ev->usage;
  u.prompt_tokens = static_cast<int32_t>(FlatSize(spec));
  u.cached_prompt_tokens = static_cast<int32_t>(r->prefix_cache_tokens + r->path_cache_tokens);
  u.queue_time_ms = Ms(g->scheduled - g->arrival);
  ev->rag = std::move(r);
}

}  // namespace superpose::engine::rag
