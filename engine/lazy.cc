#include "engine/lazy.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "engine/backend.h"

namespace superpose::engine {

LazyOptions PaperLazySchedule(int32_t num_layers) {
  LazyOptions o;
  o.mode = LazyOptions::Mode::kOn;
  for (double f : {0.29, 0.6, 0.88}) {
    // 1-based "prune after layer n" is the 0-based boundary n - 1.
    const int32_t b = static_cast<int32_t>(std::lround(f * num_layers)) - 1;
    if (b < 0 || b >= num_layers) continue;
    if (!o.boundaries.empty() && b <= o.boundaries.back()) continue;
    o.boundaries.push_back(b);
    o.keep.push_back(kLazyPaperKeep);
  }
  return o;
}

absl::Status ResolveLazy(int32_t num_layers, LazyOptions* lazy) {
  if (lazy->mode != LazyOptions::Mode::kOn) return absl::OkStatus();
  if (lazy->boundaries.empty()) {
    if (!lazy->keep.empty() && lazy->keep.size() != PaperLazySchedule(num_layers).keep.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("lazy.keep_fractions has ", lazy->keep.size(),
                       " entries but the default boundary_layers of this model have ",
                       PaperLazySchedule(num_layers).boundaries.size()));
    }
    lazy->boundaries = PaperLazySchedule(num_layers).boundaries;
  }
  if (lazy->keep.empty()) lazy->keep.assign(lazy->boundaries.size(), kLazyPaperKeep);
  if (lazy->keep.size() != lazy->boundaries.size()) {
    return absl::InvalidArgumentError(absl::StrCat("lazy.keep_fractions has ", lazy->keep.size(),
                                                   " entries, lazy.boundary_layers ",
                                                   lazy->boundaries.size()));
  }
  for (size_t i = 0; i < lazy->boundaries.size(); ++i) {
    const int32_t b = lazy->boundaries[i];
    if (b < 0 || b >= num_layers) {
      return absl::InvalidArgumentError(absl::StrCat("lazy.boundary_layers[", i, "]: ", b,
                                                     " is not a layer of this model (0..",
                                                     num_layers - 1, ")"));
    }
    if (i > 0 && b <= lazy->boundaries[i - 1]) {
      return absl::InvalidArgumentError(absl::StrCat("lazy.boundary_layers[", i, "]: ", b,
                                                     " is not above the previous boundary ",
                                                     lazy->boundaries[i - 1]));
    }
    const float k = lazy->keep[i];
    if (!(k > 0.0f && k <= 1.0f)) {
      return absl::InvalidArgumentError(
          absl::StrCat("lazy.keep_fractions[", i, "]: ", k, " is not in (0, 1]"));
    }
  }
  return absl::OkStatus();
}

std::string LazySkipReason(int32_t prompt_len, int32_t min_prompt, int32_t max_step_tokens) {
  if (prompt_len < min_prompt) {
    return absl::StrCat("prompt shorter than lazy_min_prompt (", min_prompt, " tokens)");
  }
  if (prompt_len > max_step_tokens) {
    return absl::StrCat("prompt longer than max_batch_tokens (", max_step_tokens, " tokens)");
  }
  return "";
}

int32_t LazyKeepCount(float keep, int32_t n) {
  const int64_t k = std::llround(static_cast<double>(keep) * n);
  return static_cast<int32_t>(std::clamp<int64_t>(k, 0, n));
}

std::vector<int32_t> LazyTopK(absl::Span<const float> scores, int32_t k) {
  std::vector<int32_t> idx(scores.size());
  std::iota(idx.begin(), idx.end(), 0);
  k = std::clamp<int32_t>(k, 0, static_cast<int32_t>(idx.size()));
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t b) {
    return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
  });
  idx.resize(k);
  std::sort(idx.begin(), idx.end());
  return idx;
}

int32_t LazyStageOf(absl::Span<const int32_t> boundaries, int32_t l) {
  return static_cast<int32_t>(std::lower_bound(boundaries.begin(), boundaries.end(), l) -
                              boundaries.begin());
}

namespace {

absl::Status Bad(const SeqPlan& seq, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("plan: seq ", seq.id, " lazy ", what));
}

absl::Status CheckBoundaries(const SeqPlan& seq, int32_t num_layers) {
  const LazyPlan& z = seq.lazy;
  for (size_t i = 0; i < z.boundaries.size(); ++i) {
    if (z.boundaries[i] < 0 || z.boundaries[i] >= num_layers ||
        (i > 0 && z.boundaries[i] <= z.boundaries[i - 1])) {
      return Bad(seq, "boundaries");
    }
  }
  return absl::OkStatus();
}

// Revival mode after the decision: the entries, the blocks they live in and the step's
// place (a replay of recorded tokens, or one decode token right after them).
absl::Status CheckEntries(const SeqPlan& seq, const KvPoolInfo& kv) {
  const LazyPlan& z = seq.lazy;
  const size_t B = z.boundaries.size();
  if (!z.depth.empty() || !z.stage_context.empty() || !z.stage_slots.empty()) {
    return Bad(seq, "stage fields with entries");
  }
  if (z.entries.size() != B || z.prefill_entries.size() != B) return Bad(seq, "entries");
  const bool decode = z.own_begin == z.recorded;
  if (z.own_begin < 0 || (decode && seq.num_tokens != 1) ||
      (!decode && z.own_begin + seq.num_tokens > z.recorded)) {
    return Bad(seq, "own_begin");
  }
  // Own slots up to the last token's (every stage holds at most that many entries).
  const int64_t slots = static_cast<int64_t>(z.blocks.size()) * kv.block_size;
  if (slots < static_cast<int64_t>(z.own_begin) + seq.num_tokens) return Bad(seq, "blocks");
  for (BlockId b : z.blocks) {
    if (b < 0 || b >= kv.num_blocks) return Bad(seq, "blocks");
  }
  for (size_t s = 0; s < B; ++s) {
    const std::vector<LazyEntry>& e = z.entries[s];
    if (z.prefill_entries[s] < 0 || z.prefill_entries[s] > static_cast<int32_t>(e.size()) ||
        static_cast<int32_t>(e.size()) > z.recorded) {
      return Bad(seq, "entries");
    }
    for (size_t k = 0; k < e.size(); ++k) {
      if (e[k].own < 0 || e[k].own >= z.recorded || e[k].prefix < 0 ||
          e[k].prefix > static_cast<int32_t>(k)) {
        return Bad(seq, "entries");
      }
    }
  }
  return absl::OkStatus();
}

absl::Status CheckStages(const SeqPlan& seq, const KvPoolInfo& kv) {
  const LazyPlan& z = seq.lazy;
  if (z.stage_context.size() != z.boundaries.size()) return Bad(seq, "stage_context");
  for (const auto& ctx : z.stage_context) {
    for (const KvSegment& g : ctx) {
      if (g.block < 0 || g.block >= kv.num_blocks || g.first_slot < 0 || g.length < 0 ||
          g.first_slot + g.length > kv.block_size) {
        return Bad(seq, "segment");
      }
    }
  }
  if (z.stage_slots.size() != z.boundaries.size()) return Bad(seq, "stage_slots");
  for (size_t s = 0; s < z.stage_slots.size(); ++s) {
    // With `depth`: the new tokens computed in stage s + 1; else every new token.
    int32_t want = seq.num_tokens;
    if (!z.depth.empty()) {
      want = static_cast<int32_t>(std::count_if(z.depth.begin(), z.depth.end(), [&](int32_t d) {
        return d > static_cast<int32_t>(s) + 1;
      }));
    }
    if (static_cast<int32_t>(z.stage_slots[s].size()) != want) return Bad(seq, "stage_slots");
    for (const KvSlot& k : z.stage_slots[s]) {
      if (k.block < 0 || k.block >= kv.num_blocks || k.slot < 0 || k.slot >= kv.block_size) {
        return Bad(seq, "stage_slots");
      }
    }
  }
  return absl::OkStatus();
}

absl::Status CheckDecision(const SeqPlan& seq) {
  const LazyPlan& z = seq.lazy;
  const int32_t stages = static_cast<int32_t>(z.boundaries.size()) + 1;
  if (z.revives()) {
    if (z.revive.size() != z.boundaries.size()) return Bad(seq, "revive");
    for (float k : z.revive) {
      if (!(k > 0.0f && k <= 1.0f)) return Bad(seq, "revive fraction");
    }
  }
  if (!z.keep.empty()) {
    if (!z.depth.empty() || z.keep.size() != z.boundaries.size()) return Bad(seq, "keep");
    for (float k : z.keep) {
      if (!(k > 0.0f && k <= 1.0f)) return Bad(seq, "keep fraction");
    }
  }
  if (!z.depth.empty()) {
    if (static_cast<int32_t>(z.depth.size()) != seq.num_tokens) {
      return Bad(seq, "depth");
    }
    for (int32_t d : z.depth) {
      if (d < 1 || d > stages) return Bad(seq, "depth");
    }
  }
  return absl::OkStatus();
}

// Rows that come back (logits, logprobs) must be computed by the last layer: with
// `keep` only the last token is sure to be, with `depth` those of full depth.
bool FullDepth(const SeqPlan& seq, int32_t t) {
  const int32_t j = t - seq.token_begin;
  const LazyPlan& z = seq.lazy;
  if (z.by_entries()) {  // a decode token runs every stage; a replayed one, its entries
    if (z.own_begin == z.recorded) return true;
    const std::vector<LazyEntry>& last = z.entries.back();
    return std::any_of(last.begin(), last.end(),
                       [&](const LazyEntry& e) { return e.own == z.own_begin + j; });
  }
  if (!seq.lazy.depth.empty()) {
    return seq.lazy.depth[j] == static_cast<int32_t>(seq.lazy.boundaries.size()) + 1;
  }
  return seq.lazy.keep.empty() || j == seq.num_tokens - 1;
}

absl::Status CheckRows(const BatchPlan& plan, const SeqPlan& seq) {
  auto inside = [&](int32_t t) {
    return t >= seq.token_begin && t < seq.token_begin + seq.num_tokens;
  };
  for (int32_t t : plan.logits_for) {
    if (inside(t) && !FullDepth(seq, t)) return Bad(seq, "logits row of a pruned token");
  }
  for (const LogprobRequest& r : plan.logprobs) {
    if (inside(r.token_index) && !FullDepth(seq, r.token_index)) {
      return Bad(seq, "logprob request of a pruned token");
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateLazyPlan(const BatchPlan& plan, const KvPoolInfo& kv, int32_t num_layers) {
  for (const SeqPlan& seq : plan.seqs) {
    if (!seq.lazy.active()) {
      if (!seq.lazy.keep.empty() || !seq.lazy.depth.empty() || !seq.lazy.stage_context.empty() ||
          !seq.lazy.stage_slots.empty() || seq.lazy.revives() || !seq.lazy.entries.empty()) {
        return Bad(seq, "fields without boundaries");
      }
      continue;
    }
    if (seq.num_tokens == 0) return Bad(seq, "sequence without tokens");
    absl::Status st = CheckDecision(seq);
    if (st.ok()) st = CheckBoundaries(seq, num_layers);
    if (st.ok()) st = seq.lazy.by_entries() ? CheckEntries(seq, kv) : CheckStages(seq, kv);
    if (st.ok()) st = CheckRows(plan, seq);
    if (!st.ok()) return st;
  }
  return absl::OkStatus();
}

}  // namespace superpose::engine
