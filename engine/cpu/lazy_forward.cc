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
    if (!seq.lazy.active() || !Decides(seq)) continue;
    z->result_of[si] = static_cast<int32_t>(out->lazy.size());
    ForwardOutput::Lazy r;
    r.seq = static_cast<int32_t>(si);
    r.depth.assign(seq.num_tokens, static_cast<int32_t>(seq.lazy.boundaries.size()) + 1);
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
    if (seq.lazy.keep.empty() || !AtBoundary(seq, rows.stage[si], l)) continue;
    const int32_t last = rows.begin[si] + rows.count[si] - 1;
    std::vector<float> s = LastTokenAttention(ix.keys[si], l, q, last);
    // Every rank holds some heads: the sum over all of them, the same on every rank.
    SP_RETURN_IF_ERROR(AllReduce(s.data(), static_cast<int64_t>(s.size())));
    for (float& v : s) v /= static_cast<float>(config_.num_heads);
    // The keys are the stage's context (a cached prefix: never a candidate), then the
    // rows: key ctx + k is row k.
    s.erase(s.begin(), s.end() - rows.count[si]);
    z->scores[si] = std::move(s);
  }
  return absl::OkStatus();
}

void CpuBackend::LazyPrune(const BatchPlan& plan, int32_t l, LazyStep* z, ActiveRows* rows,
                           std::vector<float>* x, ForwardOutput* out) const {
  const size_t H = config_.hidden_size;
  ActiveRows next;
  std::vector<float> nx;
  nx.reserve(x->size());
  for (size_t si = 0; si < plan.seqs.size(); ++si) {
    const SeqPlan& seq = plan.seqs[si];
    const int32_t b = rows->begin[si], n = rows->count[si], stage = rows->stage[si];
    const bool boundary = AtBoundary(seq, stage, l);
    std::vector<char> keep(n, 1);
    if (boundary && !seq.lazy.keep.empty()) {
      // Candidates: every row but the last (the query itself, always kept).
      std::fill(keep.begin(), keep.end() - 1, 0);
      const std::vector<float>& s = z->scores[si];
      const int32_t k = LazyKeepCount(seq.lazy.keep[stage], n - 1);
      for (int32_t j : LazyTopK(absl::MakeConstSpan(s.data(), n - 1), k)) keep[j] = 1;
    } else if (boundary && !seq.lazy.depth.empty()) {
      for (int32_t j = 0; j < n; ++j) {
        keep[j] = seq.lazy.depth[rows->token[b + j] - seq.token_begin] > stage + 1;
      }
    }
    next.begin.push_back(static_cast<int32_t>(next.token.size()));
    next.stage.push_back(boundary ? stage + 1 : stage);
    int32_t kept = 0;
    for (int32_t j = 0; j < n; ++j) {
      const int32_t tok = rows->token[b + j];
      if (!keep[j]) {
        if (z->result_of[si] >= 0)
          out->lazy[z->result_of[si]].depth[tok - seq.token_begin] = stage + 1;
        continue;
      }
      next.token.push_back(tok);
      // The next stage keeps its tokens compact (LazyPlan::stage_slots).
      next.slot.push_back(boundary ? seq.lazy.stage_slots[stage][kept++] : rows->slot[b + j]);
      nx.insert(nx.end(), x->begin() + (b + j) * H, x->begin() + (b + j + 1) * H);
    }
    next.count.push_back(static_cast<int32_t>(next.token.size()) - next.begin.back());
  }
  *rows = std::move(next);
  *x = std::move(nx);
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
