// LazyLLM in the CPU forward (papers.md section 2; docs/architecture.md "LazyLLM"): at a
// sequence's boundary layer the last new token's attention, averaged over every query
// head (summed over the ranks of a tensor-parallel group, so that every rank decides
// the same), scores the other new tokens; the best go on to the next stage and the
// rest leave the step's rows. Recomputation replays given decisions (LazyPlan::depth).
#include <algorithm>
#include <cmath>

#include "engine/cpu/cpu_backend.h"
#include "engine/lazy.h"
#include "engine/util/status.h"

namespace superpose::engine::cpu {
namespace {

bool Decides(const SeqPlan& seq) { return !seq.lazy.keep.empty() || !seq.lazy.depth.empty(); }

// A revival-mode decode step: one token after the recorded ones, selecting and reviving.
bool IsDecode(const SeqPlan& seq) {
  return seq.lazy.by_entries() && seq.lazy.own_begin == seq.lazy.recorded;
}

KvSlot OwnSlot(const LazyPlan& z, int32_t k, int32_t bs) { return {z.blocks[k / bs], k % bs}; }

// The own tokens a decode step revives into stage + 1: the decode token's best keys of
// the stage (itself, the last key, aside) that have no entry there, in own order.
std::vector<int32_t> RevivalChoice(const LazyPlan& z, int32_t stage,
                                   const std::vector<float>& scores,
                                   const std::vector<int32_t>& key_own) {
  const int32_t nk = static_cast<int32_t>(scores.size()) - 1;
  std::vector<char> in_next(z.recorded + 1, 0);
  for (const LazyEntry& e : z.entries[stage]) in_next[e.own] = 1;
  const int32_t keep = LazyKeepCount(z.revive[stage], nk);
  std::vector<int32_t> wake;
  for (int32_t k : LazyTopK(absl::MakeConstSpan(scores.data(), nk), keep)) {
    if (!in_next[key_own[k]]) wake.push_back(key_own[k]);
  }
  std::sort(wake.begin(), wake.end());
  return wake;
}

// Appends row r of `rows` (and its hidden state) to *next as it is (Rows: ActiveRows).
template <class Rows>
void PushRow(const Rows& rows, int32_t r, const std::vector<float>& x, size_t H, Rows* next,
             std::vector<float>* nx) {
  next->token.push_back(rows.token[r]);
  next->slot.push_back(rows.slot[r]);
  next->compact.push_back(rows.compact[r]);
  next->prefix.push_back(rows.prefix[r]);
  next->own.push_back(rows.own[r]);
  nx->insert(nx->end(), x.begin() + r * H, x.begin() + (r + 1) * H);
}

// Whether plan sequence si, now in `stage`, leaves that stage after layer l.
bool AtBoundary(const SeqPlan& seq, int32_t stage, int32_t l) {
  const std::vector<int32_t>& b = seq.lazy.boundaries;
  return stage < static_cast<int32_t>(b.size()) && b[stage] == l;
}

}  // namespace

void CpuBackend::StartLazy(const BatchPlan& plan, LazyStep* z, ForwardOutput* out) {
  z->result_of.assign(plan.seqs.size(), -1);
  z->scores.assign(plan.seqs.size(), {});
  for (size_t si = 0; si < plan.seqs.size(); ++si) {
    const SeqPlan& seq = plan.seqs[si];
    if (!seq.lazy.active() || !(Decides(seq) || seq.lazy.by_entries())) continue;
    z->result_of[si] = static_cast<int32_t>(out->lazy.size());
    ForwardOutput::Lazy r;
    r.seq = static_cast<int32_t>(si);
    r.depth.assign(seq.num_tokens, static_cast<int32_t>(seq.lazy.boundaries.size()) + 1);
    if (IsDecode(seq)) r.revived.resize(seq.lazy.boundaries.size());
    out->lazy.push_back(std::move(r));
  }
}

bool CpuBackend::AnyBoundary(const BatchPlan& plan, const ActiveRows& rows, int32_t l) {
  for (size_t si = 0; si < plan.seqs.size(); ++si) {
    if (AtBoundary(plan.seqs[si], rows.stage[si], l)) return true;
  }
  return false;
}

std::vector<float> CpuBackend::LastTokenAttention(const AttnKeys& keys, int32_t l, const float* q,
                                                  int32_t row) const {
  const int32_t D = config_.head_dim, bs = kv_info_.block_size;
  const int32_t nk = static_cast<int32_t>(keys.slots.size());
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const size_t layer_off = static_cast<size_t>(l) * kv_info_.num_blocks * bs * kv_heads_ * D;
  std::vector<double> acc(nk, 0.0), logit(nk);
  for (int32_t kvh = 0; kvh < kv_heads_; ++kvh) {
    for (int32_t h : heads_of_[kvh]) {
      const float* qh = q + (static_cast<size_t>(row) * q_heads_ + h) * D;
      double mx = -INFINITY, sum = 0.0;
      for (int32_t k = 0; k < nk; ++k) {
        const int64_t blk = keys.slots[k] / bs;
        const int32_t slot = static_cast<int32_t>(keys.slots[k] % bs);
        float s = 0.0f;
        for (int32_t d = 0; d < D; ++d) {
          const size_t e = layer_off + KeyElement(blk, slot, kvh, d, kv_heads_, D, bs);
          s += qh[d] * (kv_bf16_ ? Bf16ToF32(k_cache16_[e]) : k_cache_[e]);
        }
        logit[k] = static_cast<double>(s * scale);
        mx = std::max(mx, logit[k]);
      }
      for (int32_t k = 0; k < nk; ++k) sum += (logit[k] = std::exp(logit[k] - mx));
      for (int32_t k = 0; k < nk; ++k) acc[k] += logit[k] / sum;
    }
  }
  return std::vector<float>(acc.begin(), acc.end());
}

absl::Status CpuBackend::LazyScores(const BatchPlan& plan, const KeyIndex& ix,
                                    const ActiveRows& rows, int32_t l, const float* q,
                                    LazyStep* z) {
  for (size_t si = 0; si < plan.seqs.size(); ++si) {
    const SeqPlan& seq = plan.seqs[si];
    z->scores[si].clear();
    const bool decode = IsDecode(seq);
    if ((seq.lazy.keep.empty() && !decode) || !AtBoundary(seq, rows.stage[si], l)) continue;
    const int32_t last = rows.begin[si] + rows.count[si] - 1;
    std::vector<float> s = LastTokenAttention(ix.keys[si], l, q, last);
    // Every rank holds some heads: the sum over all of them, the same on every rank.
    SP_RETURN_IF_ERROR(AllReduce(s.data(), static_cast<int64_t>(s.size())));
    for (float& v : s) v /= static_cast<float>(config_.num_heads);
    // Deciding: the keys are the stage's context (a cached prefix: never a candidate),
    // then the rows: key ctx + k is row k. A decode step selects among every key.
    if (!decode) s.erase(s.begin(), s.end() - rows.count[si]);
    z->scores[si] = std::move(s);
  }
  return absl::OkStatus();
}

void CpuBackend::LazyPrune(const BatchPlan& plan, int32_t l, LazyStep* z, ActiveRows* rows,
                           std::vector<float>* x, ForwardOutput* out, StepBuffers* b) {
  ActiveRows next;
  std::vector<float> nx;
  nx.reserve(x->size());
  for (size_t si = 0; si < plan.seqs.size(); ++si) {
    const SeqPlan& seq = plan.seqs[si];
    const int32_t stage = rows->stage[si];
    const bool boundary = AtBoundary(seq, stage, l);
    next.begin.push_back(static_cast<int32_t>(next.token.size()));
    next.stage.push_back(boundary ? stage + 1 : stage);
    NextStageRows(plan, si, l, z, *rows, *x, &next, &nx, out, b);
    next.count.push_back(static_cast<int32_t>(next.token.size()) - next.begin.back());
  }
  *rows = std::move(next);
  *x = std::move(nx);
}

void CpuBackend::NextStageRows(const BatchPlan& plan, size_t si, int32_t l, LazyStep* z,
                               const ActiveRows& rows, const std::vector<float>& x,
                               ActiveRows* next, std::vector<float>* nx, ForwardOutput* out,
                               StepBuffers* b) {
  const size_t H = config_.hidden_size;
  const SeqPlan& seq = plan.seqs[si];
  const int32_t b0 = rows.begin[si], n = rows.count[si], stage = rows.stage[si];
  ForwardOutput::Lazy* result = z->result_of[si] >= 0 ? &out->lazy[z->result_of[si]] : nullptr;
  if (!AtBoundary(seq, stage, l)) {
    for (int32_t j = 0; j < n; ++j) PushRow(rows, b0 + j, x, H, next, nx);
    return;
  }
  if (IsDecode(seq)) {
    DecodeStageRows(seq, stage, rows, static_cast<int32_t>(si), z->scores[si], x, next, nx,
                    &result->revived[stage], b);
    return;
  }
  if (seq.lazy.by_entries()) {
    ReplayStageRows(seq, stage, rows, static_cast<int32_t>(si), x, next, nx);
    if (result != nullptr) {
      // Rows that did not go on were pruned here.
      std::vector<char> went(n, 0);
      for (size_t r = next->begin.back(); r < next->token.size(); ++r) {
        went[next->token[r] - seq.token_begin] = 1;
      }
      for (int32_t j = 0; j < n; ++j) {
        const int32_t tok = rows.token[b0 + j];
        if (!went[tok - seq.token_begin]) result->depth[tok - seq.token_begin] = stage + 1;
      }
    }
    return;
  }
  std::vector<char> keep(n, 1);
  if (!seq.lazy.keep.empty()) {
    // Candidates: every row but the last (the query itself, always kept).
    std::fill(keep.begin(), keep.end() - 1, 0);
    const std::vector<float>& s = z->scores[si];
    const int32_t k = LazyKeepCount(seq.lazy.keep[stage], n - 1);
    for (int32_t j : LazyTopK(absl::MakeConstSpan(s.data(), n - 1), k)) keep[j] = 1;
  } else if (!seq.lazy.depth.empty()) {
    for (int32_t j = 0; j < n; ++j) {
      keep[j] = seq.lazy.depth[rows.token[b0 + j] - seq.token_begin] > stage + 1;
    }
  }
  int32_t kept = 0;
  for (int32_t j = 0; j < n; ++j) {
    const int32_t r = b0 + j, tok = rows.token[r];
    if (!keep[j]) {
      if (result != nullptr) result->depth[tok - seq.token_begin] = stage + 1;
      if (seq.lazy.revives()) StoreAux(seq.id, rows.own[r], stage, &x[r * H]);
      continue;
    }
    PushRow(rows, r, x, H, next, nx);
    // The next stage keeps its tokens compact (LazyPlan::stage_slots).
    next->slot.back() = seq.lazy.stage_slots[stage][kept++];
  }
}

void CpuBackend::ReplayStageRows(const SeqPlan& seq, int32_t stage, const ActiveRows& rows,
                                 int32_t si, const std::vector<float>& x, ActiveRows* next,
                                 std::vector<float>* nx) {
  const size_t H = config_.hidden_size;
  const LazyPlan& z = seq.lazy;
  const int32_t b0 = rows.begin[si], n = rows.count[si];
  // Own index -> row, over this step's tokens.
  std::vector<int32_t> row_of(seq.num_tokens, -1);
  for (int32_t j = 0; j < n; ++j) row_of[rows.own[b0 + j] - z.own_begin] = b0 + j;
  std::vector<char> went(n, 0);
  const std::vector<LazyEntry>& entries = z.entries[stage];
  for (int32_t k = 0; k < static_cast<int32_t>(entries.size()); ++k) {
    const int32_t j = entries[k].own - z.own_begin;
    if (j < 0 || j >= seq.num_tokens || row_of[j] < 0) continue;  // another step's token
    PushRow(rows, row_of[j], x, H, next, nx);
    next->slot.back() = OwnSlot(z, k, kv_info_.block_size);
    next->compact.back() = k;
    next->prefix.back() = entries[k].prefix;
    went[row_of[j] - b0] = 1;
  }
  for (int32_t j = 0; j < n; ++j) {
    if (!went[j]) StoreAux(seq.id, rows.own[b0 + j], stage, &x[(b0 + j) * H]);
  }
}

void CpuBackend::DecodeStageRows(const SeqPlan& seq, int32_t stage, const ActiveRows& rows,
                                 int32_t si, const std::vector<float>& scores,
                                 const std::vector<float>& x, ActiveRows* next,
                                 std::vector<float>* nx, std::vector<LazyEntry>* revived,
                                 StepBuffers* b) {
  const size_t H = config_.hidden_size;
  const int32_t bs = kv_info_.block_size;
  const LazyPlan& z = seq.lazy;
  const int32_t b0 = rows.begin[si], n = rows.count[si], last = b0 + n - 1;
  // Key k's own index: stage 0 holds every own token in order; a later stage its entries,
  // then this step's rows (the tokens revived into it, then the decode token).
  std::vector<int32_t> key_own(scores.size());
  for (int32_t k = 0; k < static_cast<int32_t>(key_own.size()); ++k) key_own[k] = k;
  if (stage > 0) {
    const std::vector<LazyEntry>& e = z.entries[stage - 1];
    for (size_t k = 0; k < e.size() && k < key_own.size(); ++k) key_own[k] = e[k].own;
    for (int32_t r = b0; r <= last; ++r) key_own[rows.compact[r]] = rows.own[r];
  }
  // Tokens revived into this stage leave it here, as a prefill's pruned tokens do.
  for (int32_t r = b0; r < last; ++r) StoreAux(seq.id, rows.own[r], stage, &x[r * H]);
  const std::vector<LazyEntry>& next_entries = z.entries[stage];
  const std::vector<int32_t> wake = RevivalChoice(z, stage, scores, key_own);
  const LazyAux& aux = lazy_aux_[seq.id];
  const auto prefill_end = next_entries.begin() + z.prefill_entries[stage];
  int32_t k = static_cast<int32_t>(next_entries.size());
  for (int32_t own : wake) {
    if (own >= static_cast<int32_t>(aux.at.size()) || aux.at[own] != stage) continue;  // never
    // It attends to the entries the prefill put in the next stage before it, and itself.
    const int32_t prefix = static_cast<int32_t>(
        std::lower_bound(next_entries.begin(), prefill_end, own,
                         [](const LazyEntry& e, int32_t o) { return e.own < o; }) -
        next_entries.begin());
    next->token.push_back(b->AddRow(static_cast<float>(own)));
    next->slot.push_back(OwnSlot(z, k, bs));
    next->compact.push_back(k++);
    next->prefix.push_back(prefix);
    next->own.push_back(own);
    nx->insert(nx->end(), aux.h.begin() + own * H, aux.h.begin() + (own + 1) * H);
    revived->push_back({own, prefix});
  }
  PushRow(rows, last, x, H, next, nx);
  next->slot.back() = OwnSlot(z, k, bs);
  next->compact.back() = k;
  next->prefix.back() = k;
}

void CpuBackend::RevivalKeys(const SeqPlan& seq, const ActiveRows& rows, int32_t si,
                             KeyIndex* ix) const {
  const int32_t bs = kv_info_.block_size;
  const LazyPlan& z = seq.lazy;
  const int32_t b0 = rows.begin[si], n = rows.count[si];
  // Entries [0, len) of the stage as keys, in runs of whole blocks.
  auto append = [&](AttnKeys* keys, int32_t len) {
    for (int32_t k = 0; k < len;) {
      const int32_t run = std::min(bs - k % bs, len - k);
      keys->Append(z.blocks[k / bs], k % bs, run, bs);
      k += run;
    }
  };
  int32_t len = 0;
  for (int32_t r = b0; r < b0 + n; ++r) len = std::max(len, rows.compact[r] + 1);
  append(&ix->keys[si], len);
  // A row sees entries [0, prefix) and itself: those with prefix == k (all but the
  // revived) share the stage's list; a revived row gets a list of its own.
  auto add_items = [&](int32_t keys_of, const std::vector<int32_t>& rs) {
    for (int32_t kvh = 0; kvh < kv_heads_; ++kvh) {
      const int32_t g = static_cast<int32_t>(heads_of_[kvh].size());
      if (g == 0) continue;
      const int32_t tile = std::max(1, 32 / g);
      for (size_t i0 = 0; i0 < rs.size(); i0 += tile) {
        AttnItem item{keys_of, kvh, static_cast<int32_t>(ix->query_row.size()), 0};
        for (size_t i = i0; i < std::min(rs.size(), i0 + tile); ++i) {
          const int32_t r = rs[i];
          const int32_t nk =
              rows.prefix[r] == rows.compact[r] ? rows.compact[r] + 1 : rows.prefix[r] + 1;
          for (int32_t h : heads_of_[kvh]) {
            ix->query_row.push_back(static_cast<int64_t>(r) * q_heads_ + h);
            ix->query_nk.push_back(nk);
          }
        }
        item.count = static_cast<int32_t>(ix->query_row.size()) - item.first;
        ix->items.push_back(item);
      }
    }
  };
  std::vector<int32_t> shared;
  for (int32_t r = b0; r < b0 + n; ++r) {
    if (rows.prefix[r] == rows.compact[r]) {
      shared.push_back(r);
      continue;
    }
    AttnKeys own;
    append(&own, rows.prefix[r]);
    const KvSlot slot = rows.slot[r];
    own.Append(slot.block, slot.slot, 1, bs);
    ix->keys.push_back(std::move(own));
    add_items(static_cast<int32_t>(ix->keys.size()) - 1, {r});
  }
  add_items(si, shared);
}

void CpuBackend::StoreAux(SeqId id, int32_t own, int32_t stage, const float* h) {
  const size_t H = config_.hidden_size;
  LazyAux& aux = lazy_aux_[id];
  if (static_cast<int32_t>(aux.at.size()) <= own) {
    const size_t n = std::max<size_t>(own + 1, aux.at.size() * 2);
    aux.at.resize(n, -1);
    aux.h.resize(n * H);
  }
  aux.at[own] = stage;
  std::copy(h, h + H, aux.h.begin() + own * H);
}

int64_t CpuBackend::LazyAuxBytes() const {
  int64_t n = 0;
  for (const auto& [id, aux] : lazy_aux_) n += static_cast<int64_t>(aux.h.size() * sizeof(float));
  return n;
}

void CpuBackend::ReleaseSequence(SeqId id) {
  auto it = lazy_aux_.find(id);
  if (it == lazy_aux_.end()) return;
  std::fill(it->second.h.begin(), it->second.h.end(), 0.0f);  // prompt-derived state
  lazy_aux_.erase(it);
}

void CpuBackend::LazyCount(const ActiveRows& rows, int32_t l, const LazyStep& z,
                           ForwardOutput* out) {
  for (size_t si = 0; si < z.result_of.size(); ++si) {
    if (z.result_of[si] < 0) continue;
    std::vector<int32_t>& c = out->lazy[z.result_of[si]].layer_tokens;
    if (static_cast<int32_t>(c.size()) <= l) c.resize(l + 1, 0);
    c[l] += rows.count[si];
  }
}

}  // namespace superpose::engine::cpu
