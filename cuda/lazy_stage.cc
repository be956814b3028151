#include "cuda/lazy_stage.h"

#include <algorithm>
#include <numeric>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "cuda/lora_segments.h"
#include "engine/lazy.h"

namespace superpose::cuda {
namespace {

bool Decides(const engine::SeqPlan& seq) {
  return !seq.lazy.keep.empty() || !seq.lazy.depth.empty();
}

const std::vector<engine::KvSegment>& StageContext(const engine::SeqPlan& seq, int32_t stage) {
  return stage == 0 ? seq.context : seq.lazy.stage_context[stage - 1];
}

int32_t ContextLength(const std::vector<engine::KvSegment>& ctx) {
  int32_t n = 0;
  for (const engine::KvSegment& g : ctx) n += g.length;
  return n;
}

// Plan token -> row, -1 for tokens without one.
std::vector<int32_t> RowOfToken(const engine::BatchPlan& plan, const LazyRows& rows) {
  std::vector<int32_t> row_of(plan.tokens.size(), -1);
  for (size_t r = 0; r < rows.token.size(); ++r) row_of[rows.token[r]] = static_cast<int32_t>(r);
  return row_of;
}

// The score items of the sequences deciding at the end of their current stage, sorted
// by layer, appended to m.
void AppendScoreItems(const engine::BatchPlan& plan, const LazyRows& rows, StageMeta* m) {
  std::vector<std::pair<int32_t, int32_t>> order;  // (layer, seq)
  std::vector<int32_t> key_off(plan.seqs.size(), 0), ctx_len(plan.seqs.size(), 0);
  int32_t off = 0;
  for (size_t si = 0; si < plan.seqs.size(); ++si) {
    const engine::SeqPlan& seq = plan.seqs[si];
    if (rows.count[si] == 0) continue;
    key_off[si] = off;
    ctx_len[si] = ContextLength(StageContext(seq, rows.stage[si]));
    off += ctx_len[si] + rows.count[si];
    const int32_t stage = rows.stage[si];
    if (seq.lazy.keep.empty() || stage >= static_cast<int32_t>(seq.lazy.boundaries.size())) {
      continue;
    }
    order.emplace_back(seq.lazy.boundaries[stage], static_cast<int32_t>(si));
  }
  std::sort(order.begin(), order.end());
  m->off_items = m->sm.words.size();
  for (const auto& [layer, si] : order) {
    LazyScoreItem it;
    it.row = rows.begin[si] + rows.count[si] - 1;
    it.key_off = key_off[si];
    it.nk = ctx_len[si] + rows.count[si];
    it.out_off = m->score_floats;
    m->score_floats += it.nk;
    m->items.push_back(it);
    m->item_seq.push_back(si);
    m->item_layer.push_back(layer);
    m->sm.words.insert(m->sm.words.end(), {it.row, it.key_off, it.nk, it.out_off});
  }
}

}  // namespace

bool AnyLazy(const engine::BatchPlan& plan) {
  return std::any_of(plan.seqs.begin(), plan.seqs.end(),
                     [](const engine::SeqPlan& s) { return s.lazy.active(); });
}

absl::Status CheckNoRevival(const engine::BatchPlan& plan) {
  for (const engine::SeqPlan& seq : plan.seqs) {
    const engine::LazyPlan& z = seq.lazy;
    if (z.revives() || !z.entries.empty() || !z.prefill_entries.empty() || !z.blocks.empty() ||
        z.own_begin != 0 || z.recorded != 0) {
      return absl::UnimplementedError(absl::StrCat(
          "lazy.revive: the cuda backend does not revive pruned tokens (sequence ", seq.id, ")"));
    }
  }
  return absl::OkStatus();
}

LazyRows AllLazyRows(const engine::BatchPlan& plan) {
  LazyRows rows;
  rows.token.resize(plan.tokens.size());
  std::iota(rows.token.begin(), rows.token.end(), 0);
  rows.slot = plan.kv_slots;
  for (const engine::SeqPlan& seq : plan.seqs) {
    rows.begin.push_back(seq.token_begin);
    rows.count.push_back(seq.num_tokens);
    rows.stage.push_back(0);
  }
  return rows;
}

bool LazyAtBoundary(const engine::SeqPlan& seq, int32_t stage, int32_t l) {
  const std::vector<int32_t>& b = seq.lazy.boundaries;
  return stage < static_cast<int32_t>(b.size()) && b[stage] == l;
}

engine::BatchPlan StagePlan(const engine::BatchPlan& plan, const LazyRows& rows) {
  engine::BatchPlan p;
  for (size_t r = 0; r < rows.token.size(); ++r) {
    p.tokens.push_back(plan.tokens[rows.token[r]]);
    p.positions.push_back(plan.positions[rows.token[r]]);
  }
  p.kv_slots = rows.slot;
  for (size_t si = 0; si < plan.seqs.size(); ++si) {
    const engine::SeqPlan& seq = plan.seqs[si];
    engine::SeqPlan s;
    s.id = seq.id;
    s.context = StageContext(seq, rows.stage[si]);
    s.token_begin = rows.begin[si];
    s.num_tokens = rows.count[si];
    s.adapter = seq.adapter;
    p.seqs.push_back(std::move(s));
  }
  const std::vector<int32_t> row_of = RowOfToken(plan, rows);
  for (int32_t t : plan.logits_for) p.logits_for.push_back(row_of[t]);
  p.logits_top = plan.logits_top;
  p.sampling = plan.sampling;
  for (const engine::LogprobRequest& r : plan.logprobs) {
    p.logprobs.push_back({row_of[r.token_index], r.target});
  }
  return p;
}

absl::StatusOr<StageMeta> BuildStageMeta(const engine::BatchPlan& plan, const LazyRows& rows,
                                         const std::vector<const void*>& lora_descs,
                                         const std::vector<int32_t>& gather, int32_t block_size,
                                         int32_t max_tile_tokens) {
  StageMeta m;
  absl::StatusOr<StepMeta> sm = BuildStepMeta(StagePlan(plan, rows), block_size, max_tile_tokens);
  if (!sm.ok()) return sm.status();
  m.sm = *std::move(sm);
  std::vector<LoraSeqRows> lora(plan.seqs.size());
  bool any_lora = false;
  for (size_t si = 0; si < plan.seqs.size() && si < lora_descs.size(); ++si) {
    if (lora_descs[si] == nullptr) continue;
    lora[si] = {rows.begin[si], rows.count[si], lora_descs[si]};
    any_lora = true;
  }
  if (any_lora) {
    m.sm.off_lora = m.sm.words.size();
    m.sm.num_lora_segs = AppendLoraSegments(lora, &m.sm.words);
  }
  AppendScoreItems(plan, rows, &m);
  m.off_gather = m.sm.words.size();
  m.sm.words.insert(m.sm.words.end(), gather.begin(), gather.end());
  return m;
}

size_t LazyMetaWordsBound(const engine::BatchPlan& plan, size_t first_stage_words) {
  size_t extra = plan.tokens.size() + 4 * plan.seqs.size();  // gather rows, score items
  for (const engine::SeqPlan& seq : plan.seqs) {
    for (const std::vector<engine::KvSegment>& ctx : seq.lazy.stage_context) {
      extra += static_cast<size_t>(ContextLength(ctx));
    }
  }
  return first_stage_words + extra;
}

size_t LazyScoreFloatsBound(const engine::BatchPlan& plan) {
  size_t n = 0;
  for (const engine::SeqPlan& seq : plan.seqs) {
    if (seq.lazy.keep.empty()) continue;
    int32_t most = 0;
    for (size_t s = 0; s < seq.lazy.boundaries.size(); ++s) {
      most = std::max(most, ContextLength(StageContext(seq, static_cast<int32_t>(s))));
    }
    n += static_cast<size_t>(most) + static_cast<size_t>(seq.num_tokens);
  }
  return n;
}

void StartLazyOutput(const engine::BatchPlan& plan, std::vector<int32_t>* result_of,
                     engine::ForwardOutput* out) {
  result_of->assign(plan.seqs.size(), -1);
  for (size_t si = 0; si < plan.seqs.size(); ++si) {
    const engine::SeqPlan& seq = plan.seqs[si];
    if (!seq.lazy.active() || !Decides(seq)) continue;
    (*result_of)[si] = static_cast<int32_t>(out->lazy.size());
    engine::ForwardOutput::Lazy r;
    r.seq = static_cast<int32_t>(si);
    r.depth.assign(seq.num_tokens, static_cast<int32_t>(seq.lazy.boundaries.size()) + 1);
    out->lazy.push_back(std::move(r));
  }
}

void CountLazyRows(const LazyRows& rows, int32_t l, const std::vector<int32_t>& result_of,
                   engine::ForwardOutput* out) {
  for (size_t si = 0; si < result_of.size(); ++si) {
    if (result_of[si] < 0) continue;
    std::vector<int32_t>& c = out->lazy[result_of[si]].layer_tokens;
    if (static_cast<int32_t>(c.size()) <= l) c.resize(l + 1, 0);
    c[l] += rows.count[si];
  }
}

namespace {

// Which of the n rows of sequence si (in `stage`, at its boundary) go on.
std::vector<char> KeptRows(const engine::SeqPlan& seq, const LazyRows& rows, size_t si,
                           const std::vector<float>& scores) {
  const int32_t b = rows.begin[si], n = rows.count[si], stage = rows.stage[si];
  std::vector<char> keep(n, 1);
  if (!seq.lazy.keep.empty()) {
    // Candidates: every row but the last (the query itself, always kept).
    std::fill(keep.begin(), keep.end() - 1, 0);
    const int32_t k = engine::LazyKeepCount(seq.lazy.keep[stage], n - 1);
    for (int32_t j : engine::LazyTopK(absl::MakeConstSpan(scores.data(), n - 1), k)) keep[j] = 1;
  } else if (!seq.lazy.depth.empty()) {
    for (int32_t j = 0; j < n; ++j) {
      keep[j] = seq.lazy.depth[rows.token[b + j] - seq.token_begin] > stage + 1;
    }
  }
  return keep;
}

}  // namespace

void LazyPruneRows(const engine::BatchPlan& plan, int32_t l,
                   const std::vector<std::vector<float>>& scores,
                   const std::vector<int32_t>& result_of, LazyRows* rows,
                   std::vector<int32_t>* gather, engine::ForwardOutput* out) {
  LazyRows next;
  gather->clear();
  for (size_t si = 0; si < plan.seqs.size(); ++si) {
    const engine::SeqPlan& seq = plan.seqs[si];
    const int32_t b = rows->begin[si], n = rows->count[si], stage = rows->stage[si];
    const bool boundary = LazyAtBoundary(seq, stage, l);
    const std::vector<char> keep =
        boundary ? KeptRows(seq, *rows, si, scores[si]) : std::vector<char>(n, 1);
    next.begin.push_back(static_cast<int32_t>(next.token.size()));
    next.stage.push_back(boundary ? stage + 1 : stage);
    int32_t kept = 0;
    for (int32_t j = 0; j < n; ++j) {
      const int32_t tok = rows->token[b + j];
      if (!keep[j]) {
        if (result_of[si] >= 0) out->lazy[result_of[si]].depth[tok - seq.token_begin] = stage + 1;
        continue;
      }
      next.token.push_back(tok);
      // The next stage keeps its tokens compact (LazyPlan::stage_slots).
      next.slot.push_back(boundary ? seq.lazy.stage_slots[stage][kept++] : rows->slot[b + j]);
      gather->push_back(b + j);
    }
    next.count.push_back(static_cast<int32_t>(next.token.size()) - next.begin.back());
  }
  *rows = std::move(next);
}

}  // namespace superpose::cuda
