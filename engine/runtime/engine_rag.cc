// Superposition RAG requests in the engine (docs/rag.md): a request group runs a
// preamble sequence, then one path sequence per document over the preamble's blocks
// (document tokens unless the path cache has them, then the query copy; every
// within-segment token is scored), then prunes to the top-k paths and decodes an
// answer sequence whose context is the preamble and the kept paths. Every sequence is
// an ordinary sequence to the scheduler (batched, chunked, preemptible).
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "engine/runtime/engine.h"
#include "engine/runtime/engine_internal.h"
#include "spdlog/spdlog.h"

namespace superpose::engine {
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

std::unique_ptr<Engine::Sequence> NewInternal(uint64_t handle, const Engine::RagGroup& g) {
  const Request& req = g.req;
  auto seq = std::make_unique<Engine::Sequence>();
  seq->handle = handle;
  seq->log_id = g.log_id;
  seq->req.tenant = req.tenant;
  seq->req.deadline = req.deadline;
  seq->req.priority = req.priority;
  seq->arrival = g.arrival;
  return seq;
}

}  // namespace

uint64_t Engine::PreambleKey(const RagGroup& g) {
  return rag::PathCache::Key(g.req.tenant, g.spec().preamble, {}, -1.0f, 0.0f);
}

void Engine::StartGroup(RagGroup* g) {
  const rag::Spec& spec = g->spec();
  g->paths.resize(spec.documents.size());
  spdlog::info(
      "req={} rag documents={} preamble_tokens={} query_tokens={} postamble_tokens={} "
      "top_k={}",
      g->log_id.str(), spec.documents.size(), spec.preamble.size(), spec.query.size(),
      spec.postamble.size(), spec.options.top_k);
  if (spec.preamble.empty()) {
    StartPaths(g);
    return;
  }
  // With the path cache on, the whole preamble (its partial last block too) is a
  // cache entry of its own: the ancestor of every document entry.
  if (spec.options.path_cache) {
    const int32_t nb = (static_cast<int32_t>(spec.preamble.size()) + block_size_ - 1) / block_size_;
    if (auto hit = path_cache_->Lookup(PreambleKey(*g), nb)) {
      g->preamble_blocks = std::move(hit->blocks);
      g->preamble_len = static_cast<int32_t>(spec.preamble.size());
      g->prefix_cached = g->preamble_len;
      StartPaths(g);
      return;
    }
  }
  auto seq = NewInternal(next_internal_id_++, *g);
  seq->role = SeqRole::kPreamble;
  seq->group = g;
  seq->tokens = spec.preamble;
  seq->prompt_len = static_cast<int32_t>(seq->tokens.size());
  // Priority order among waiting requests; FCFS within a priority.
  auto it = std::find_if(waiting_.begin(), waiting_.end(),
                         [&](const auto& w) { return w->req.priority < g->req.priority; });
  waiting_.insert(it, std::move(seq));
}

void Engine::OnPreambleDone(Sequence* seq) {
  RagGroup* g = seq->group;
  g->preamble_blocks = std::move(seq->blocks);
  seq->blocks.clear();
  seq->block_hashes.clear();
  g->preamble_len = seq->computed;
  g->prefix_cached = seq->cached_prompt_tokens;
  g->preamble_flops = seq->flops;
  if (g->spec().options.path_cache) path_cache_->Insert(PreambleKey(*g), g->preamble_blocks, 0, 0);
  seq->finished = true;
  StartPaths(g);
}

void Engine::StartPaths(RagGroup* g) {
  const rag::Spec& spec = g->spec();
  const int32_t n = static_cast<int32_t>(spec.documents.size());
  std::vector<KvSegment> preamble_ctx;
  AppendBlockSegments(g->preamble_blocks, g->preamble_len, block_size_, &preamble_ctx);
  std::vector<float> query_pos(spec.query.size());
  for (size_t j = 0; j < query_pos.size(); ++j) query_pos[j] = g->layout.query_start + j;

  std::vector<std::unique_ptr<Sequence>> seqs;
  for (int32_t i = 0; i < n; ++i) {
    const std::vector<int32_t>& doc = spec.documents[i];
    RagGroup::Path& path = g->paths[i];
    path.key = rag::PathCache::Key(g->req.tenant, spec.preamble, doc, g->layout.doc_start[i],
                                   g->layout.doc_step[i]);
    const int32_t doc_len = static_cast<int32_t>(doc.size());
    const int32_t doc_blocks = (doc_len + block_size_ - 1) / block_size_;
    if (spec.options.path_cache) {
      if (std::optional<rag::PathCache::Entry> hit = path_cache_->Lookup(path.key, doc_blocks)) {
        path.cached = true;
        path.doc_blocks = std::move(hit->blocks);
        path.ll.doc_sum = hit->doc_sum;
        path.ll.doc_count = hit->doc_count;
        stat_path_hits_.fetch_add(1);
      } else {
        stat_path_misses_.fetch_add(1);
      }
    }
    auto seq = NewInternal(next_internal_id_++, *g);
    seq->role = SeqRole::kPath;
    seq->group = g;
    seq->path = i;
    seq->ctx = preamble_ctx;
    seq->ctx_tokens = g->preamble_len;
    if (path.cached) {
      AppendBlockSegments(path.doc_blocks, doc_len, block_size_, &seq->ctx);
      seq->ctx_tokens += doc_len;
    } else {
      seq->tokens = doc;
      seq->doc_len = doc_len;
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
  InsertWaitingFront(std::move(seqs));
}

void Engine::OnPathDone(Sequence* seq, const float* logits) {
  RagGroup* g = seq->group;
  RagGroup::Path& path = g->paths[seq->path];
  if (!path.cached) {
    const int32_t doc_blocks = (seq->doc_len + block_size_ - 1) / block_size_;
    path.doc_blocks.assign(seq->blocks.begin(), seq->blocks.begin() + doc_blocks);
    path.query_blocks.assign(seq->blocks.begin() + doc_blocks, seq->blocks.end());
    path.ll.doc_sum = seq->ll.doc_sum;
    path.ll.doc_count = seq->ll.doc_count;
    if (g->spec().options.path_cache) {
      path_cache_->Insert(path.key, path.doc_blocks, path.ll.doc_sum, path.ll.doc_count);
    }
  } else {
    path.query_blocks = seq->blocks;
  }
  seq->blocks.clear();
  seq->block_hashes.clear();
  path.ll.query_sum = seq->ll.query_sum;
  path.ll.query_count = seq->ll.query_count;
  path.flops = seq->flops;
  if (logits != nullptr) path.last_logits.assign(logits, logits + config_.vocab_size);
  path.done = true;
  seq->finished = true;
  if (--g->pending == 0) Join(g);
}

void Engine::Join(RagGroup* g) {
  const rag::Spec& spec = g->spec();
  const int32_t n = static_cast<int32_t>(g->paths.size());
  std::vector<double> scores(n);
  for (int32_t i = 0; i < n; ++i) {
    g->paths[i].score = rag::Saliency(g->paths[i].ll, spec.options.doc_weight);
    scores[i] = g->paths[i].score;
  }
  const std::vector<int32_t> kept = rag::TopK(scores, spec.options.top_k);
  for (int32_t a : kept) g->paths[a].kept = true;
  // Pruning: the blocks of dropped paths go back now (cached documents stay findable).
  for (RagGroup::Path& path : g->paths) {
    if (path.kept) continue;
    for (BlockId b : path.doc_blocks) blocks_->Release(b);
    for (BlockId b : path.query_blocks) blocks_->Release(b);
    path.doc_blocks.clear();
    path.query_blocks.clear();
    path.last_logits.clear();
  }

  // The answer carries the whole request (sampling, stops) and the client's callback.
  auto answer = std::make_unique<Sequence>();
  answer->handle = next_internal_id_++;
  answer->arrival = g->arrival;
  answer->role = SeqRole::kAnswer;
  answer->group = g;
  answer->log_id = g->log_id;
  answer->req = g->req;
  answer->callback = g->callback;
  answer->scheduled = g->scheduled;
  AppendBlockSegments(g->preamble_blocks, g->preamble_len, block_size_, &answer->ctx);
  answer->ctx_tokens = g->preamble_len;
  // The sampler's and detokenizer's view of the prompt: p, kept documents, q, t.
  std::vector<int32_t> prompt = spec.preamble;
  const int32_t q = static_cast<int32_t>(spec.query.size());
  for (int32_t a : kept) {
    const int32_t doc_len = static_cast<int32_t>(spec.documents[a].size());
    AppendBlockSegments(g->paths[a].doc_blocks, doc_len, block_size_, &answer->ctx);
    AppendBlockSegments(g->paths[a].query_blocks, q, block_size_, &answer->ctx);
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
    EmitToken(answer.get(), g->paths[best].last_logits.data());
    for (RagGroup::Path& path : g->paths) path.last_logits.clear();
    if (answer->finished) return;  // one token was all it needed
  }
  std::vector<std::unique_ptr<Sequence>> seqs;
  seqs.push_back(std::move(answer));
  InsertWaitingFront(std::move(seqs));
}

void Engine::ReleaseGroupBlocks(RagGroup* g) {
  for (BlockId b : g->preamble_blocks) blocks_->Release(b);
  g->preamble_blocks.clear();
  for (RagGroup::Path& path : g->paths) {
    for (BlockId b : path.doc_blocks) blocks_->Release(b);
    for (BlockId b : path.query_blocks) blocks_->Release(b);
    path.doc_blocks.clear();
    path.query_blocks.clear();
    path.last_logits.clear();
  }
}

void Engine::FailGroup(RagGroup* g, FinishReason reason, absl::Status status) {
  if (g->done) return;
  g->done = true;
  auto finish_sibling = [&](Sequence* s) {
    if (s->group != g || s->finished) return;
    s->finished = true;
    FreeBlocks(s);
  };
  for (auto& s : running_) finish_sibling(s.get());
  for (auto& s : waiting_) finish_sibling(s.get());
  ReleaseGroupBlocks(g);
  StreamEvent ev;
  ev.finished = true;
  ev.finish_reason = reason;
  ev.status = status;
  const absl::Time now = absl::Now();
  ev.usage.prompt_tokens = static_cast<int32_t>(rag::FlatSize(g->spec()));
  ev.usage.queue_time_ms =
      Ms((g->scheduled == absl::InfinitePast() ? now : g->scheduled) - g->arrival);
  ev.usage.total_time_ms = Ms(now - g->arrival);
  // Ids, counts and timings only (LogId: a validated request id).
  spdlog::info("req={} handle={} rag finish={} status={} documents={} total_ms={:.1f}",
               g->log_id.str(), g->handle, FinishReasonName(reason),
               absl::StatusCodeToString(status.code()), g->paths.size(), ev.usage.total_time_ms);
  if (observer_ != nullptr) observer_->OnFinished(ev.usage, reason, status);
  if (g->callback) g->callback(std::move(ev));
  g->callback = nullptr;
}

void Engine::FillRagResult(RagGroup* g, Sequence* answer) {
  const rag::Spec& spec = g->spec();
  auto r = std::make_shared<rag::Result>();
  r->mode = rag::Mode::kSuperposition;
  r->prefix_cache_tokens = g->prefix_cached;
  r->computed_tokens = g->preamble_len - g->prefix_cached + answer->prompt_len;
  double longest_path = 0;
  double paths_total = 0;
  const int64_t q = static_cast<int64_t>(spec.query.size());
  for (size_t i = 0; i < g->paths.size(); ++i) {
    const RagGroup::Path& path = g->paths[i];
    const int64_t doc_len = static_cast<int64_t>(spec.documents[i].size());
    rag::DocResult d;
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
  r->flops.total = g->preamble_flops + paths_total + answer->flops;
  r->flops.critical_path = g->preamble_flops + longest_path + answer->flops;
  r->naive_flops = rag::NaiveFlops(flop_model_, rag::FlatSize(spec), 0, answer->generated);
  g->result = std::move(r);
}

}  // namespace superpose::engine
