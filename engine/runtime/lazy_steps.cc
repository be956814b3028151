#include "engine/runtime/lazy_steps.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "engine/runtime/step_plan.h"

namespace superpose::engine {

absl::Status ResolveRequestLazy(const LazyEngineOptions& options, int32_t num_layers,
                                bool backend_supports, bool backend_revives, LazyOptions* lazy) {
  if (lazy->mode == LazyOptions::Mode::kDefault) {
    *lazy = options.default_schedule;
    if (!backend_supports) lazy->mode = LazyOptions::Mode::kOff;
  } else if (lazy->mode == LazyOptions::Mode::kOn && !backend_supports) {
    return absl::UnimplementedError("lazy: this server's backend does not run LazyLLM pruning");
  } else if (!lazy->revive_set) {
    lazy->revive = options.default_schedule.revive;
  }
  if (lazy->revive && !backend_revives) {
    if (lazy->revive_set && lazy->mode == LazyOptions::Mode::kOn) {
      return absl::UnimplementedError(
          "lazy.revive: this server's backend does not revive pruned tokens");
    }
    lazy->revive = false;  // a server default the backend cannot run
  }
  return ResolveLazy(num_layers, lazy);
}

void StartLazySequence(const LazyOptions& lazy, int32_t min_prompt, int32_t max_batch_tokens,
                       Sequence* seq) {
  if (lazy.mode != LazyOptions::Mode::kOn) return;
  std::string why = LazySkipReason(seq->prompt_len, min_prompt, max_batch_tokens);
  if (!why.empty()) {
    seq->lazy.skipped = std::move(why);
    return;
  }
  seq->lazy.boundaries = lazy.boundaries;
  seq->lazy.keep = lazy.keep;
  seq->lazy.revive = lazy.revive;
  // A cached prefix is reused as computed (in every stage, never pruned); the sequence's
  // own blocks hold its stages compacted, which no other sequence may read as a prefix.
  seq->publishes_prefix = false;
}

void DropChunkedLazy(Sequence* seq, int32_t num_tokens) {
  if (!seq->lazy.active() || seq->lazy.decided()) return;
  if (seq->computed == seq->cached_prompt_tokens && num_tokens == seq->remaining()) return;
  const int64_t reserved = seq->lazy.aux_reserved;  // the engine still holds it for seq
  seq->lazy = LazyState{};
  seq->lazy.aux_reserved = reserved;
  seq->lazy.skipped = "prefill was split over steps";
}

namespace {

// Own tokens before seq.computed that stage s holds: counted from the decision's totals
// once every decided token is computed (a decode step), scanned during a replay.
int32_t StageBase(const Sequence& seq, int32_t s) {
  const LazyState& z = seq.lazy;
  const int32_t decided = static_cast<int32_t>(z.depth.size());
  if (z.decided() && seq.computed >= decided) {
    return z.decided_at + z.stage_tokens[s] + (seq.computed - decided);
  }
  int32_t base = 0;
  for (int32_t i = 0; i < seq.computed; ++i) base += z.DepthOf(i) > s;
  return base;
}

// Revival mode after the decision: the stages as entries (LazyPlan::by_entries).
void FillRevivalPlan(const Sequence& seq, LazyPlan* plan) {
  const LazyState& z = seq.lazy;
  plan->revive = z.keep;
  plan->entries = z.entries;
  plan->prefill_entries = z.prefill_entries;
  plan->blocks = seq.blocks;
  plan->own_begin = seq.computed;
  plan->recorded = z.recorded;
}

}  // namespace

void FillLazyPlan(const Sequence& seq, int32_t num_tokens, int32_t bs, LazyPlan* plan) {
  *plan = LazyPlan{};
  if (!seq.lazy.active()) return;
  plan->boundaries = seq.lazy.boundaries;
  const bool deciding = !seq.lazy.decided();
  if (seq.lazy.revive && !deciding) return FillRevivalPlan(seq, plan);
  if (seq.lazy.revive) {  // the deciding prefill fills the Aux Cache
    plan->revive = seq.lazy.keep;
    plan->own_begin = seq.computed;
  }
  if (deciding) {
    plan->keep = seq.lazy.keep;  // the whole prompt, no context (DropChunkedLazy)
  } else if (seq.computed < static_cast<int32_t>(seq.lazy.depth.size())) {
    // Recomputation (after preemption): the decided depths.
    for (int32_t j = 0; j < num_tokens; ++j) {
      plan->depth.push_back(seq.lazy.DepthOf(seq.computed + j));
    }
  }
  // Stage s keeps its tokens compact (LazyPlan): its k-th token at own slot k.
  for (int32_t s = 1; s < seq.lazy.stages(); ++s) {
    int32_t base = StageBase(seq, s);
    plan->stage_context.emplace_back();
    AppendOwnSegments(seq, base, bs, &plan->stage_context.back());
    std::vector<KvSlot>& slots = plan->stage_slots.emplace_back();
    for (int32_t j = 0; j < num_tokens; ++j) {
      if (deciding || seq.lazy.DepthOf(seq.computed + j) > s)
        slots.push_back(OwnSlot(seq, base++, bs));
    }
  }
}

int64_t TakeLazyDecision(const ForwardOutput::Lazy& result, Sequence* seq) {
  LazyState& z = seq->lazy;
  if (z.decided() || !z.active()) return 0;
  // The cached prefix before the decision is in every stage.
  z.decided_at = seq->computed;
  z.depth.assign(seq->computed, z.stages());
  z.depth.insert(z.depth.end(), result.depth.begin(), result.depth.end());
  // Per stage, the tokens this request computed there (the cached prefix aside).
  z.stage_tokens.assign(z.stages(), 0);
  for (int32_t d : result.depth) {
    for (int32_t s = 0; s < d; ++s) ++z.stage_tokens[s];
  }
  if (z.revive) {
    // Stage s + 1's entries: the cached prefix, then the tokens that went on, in order.
    const int32_t B = z.stages() - 1;
    z.entries.assign(B, {});
    for (int32_t s = 0; s < B; ++s) {
      std::vector<LazyEntry>& e = z.entries[s];
      for (int32_t i = 0; i < static_cast<int32_t>(z.depth.size()); ++i) {
        if (z.depth[i] > s + 1) e.push_back({i, static_cast<int32_t>(e.size())});
      }
      z.prefill_entries.push_back(static_cast<int32_t>(e.size()));
    }
    z.recorded = static_cast<int32_t>(z.depth.size());
  }
  return static_cast<int64_t>(result.depth.size()) - z.stage_tokens.back();
}

int64_t TakeLazyRevival(const ForwardOutput::Lazy& result, Sequence* seq) {
  LazyState& z = seq->lazy;
  if (!z.revive || !z.decided() || result.revived.empty() || seq->computed != z.recorded) {
    return 0;
  }
  int64_t revived = 0;
  for (size_t s = 0; s < z.entries.size(); ++s) {
    std::vector<LazyEntry>& e = z.entries[s];
    for (const LazyEntry& r : result.revived[s]) {
      e.push_back(r);
      // A prompt token computed in one more stage (usage counts them).
      if (r.own < static_cast<int32_t>(z.depth.size())) {
        z.depth[r.own] = std::max(z.depth[r.own], static_cast<int32_t>(s) + 2);
        ++z.stage_tokens[s + 1];
      }
    }
    revived += static_cast<int64_t>(result.revived[s].size());
    e.push_back({seq->computed, static_cast<int32_t>(e.size())});  // the step's own token
  }
  ++z.recorded;
  z.revived += revived;
  return revived;
}

void CapLazyReplay(const Sequence& seq, int32_t* num_tokens) {
  const LazyState& z = seq.lazy;
  if (!z.revive || !z.decided() || seq.computed >= z.recorded) return;
  *num_tokens = std::min(*num_tokens, z.recorded - seq.computed);
}

}  // namespace superpose::engine
