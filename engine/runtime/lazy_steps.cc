#include "engine/runtime/lazy_steps.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace superpose::engine {

absl::Status ResolveRequestLazy(const LazyEngineOptions& options, int32_t num_layers,
                                bool backend_supports, LazyOptions* lazy) {
  if (lazy->mode == LazyOptions::Mode::kDefault) {
    *lazy = options.default_schedule;
    if (!backend_supports) lazy->mode = LazyOptions::Mode::kOff;
  } else if (lazy->mode == LazyOptions::Mode::kOn && !backend_supports) {
    return absl::UnimplementedError("lazy: this server's backend does not run LazyLLM pruning");
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
  seq->prefix_cache = false;
}

void DropChunkedLazy(Sequence* seq, int32_t num_tokens) {
  if (!seq->lazy.active() || seq->lazy.decided()) return;
  if (seq->computed == 0 && num_tokens == seq->remaining()) return;
  seq->lazy = LazyState{};
  seq->lazy.skipped = "prefill was split over steps";
}

namespace {

// Own tokens [0, n) that are computed in `stage`, as segments of seq's blocks.
std::vector<KvSegment> StageSegments(const Sequence& seq, int32_t n, int32_t stage, int32_t bs) {
  std::vector<KvSegment> out;
  for (int32_t i = 0; i < n; ++i) {
    if (seq.lazy.DepthOf(i) <= stage) continue;
    const int32_t st = StorageIndex(seq.gap_at, bs, i);
    const BlockId b = seq.blocks[st / bs];
    KvSegment* last = out.empty() ? nullptr : &out.back();
    if (last != nullptr && last->block == b && last->first_slot + last->length == st % bs) {
      ++last->length;
    } else {
      out.push_back({b, st % bs, 1});
    }
  }
  return out;
}

}  // namespace

void FillLazyPlan(const Sequence& seq, int32_t num_tokens, int32_t bs, LazyPlan* plan) {
  *plan = LazyPlan{};
  if (!seq.lazy.active()) return;
  plan->boundaries = seq.lazy.boundaries;
  for (int32_t s = 1; s < seq.lazy.stages(); ++s) {
    plan->stage_context.push_back(StageSegments(seq, seq.computed, s, bs));
  }
  if (!seq.lazy.decided()) {
    plan->keep = seq.lazy.keep;  // the whole prompt, no context (DropChunkedLazy)
    return;
  }
  if (seq.computed < static_cast<int32_t>(seq.lazy.depth.size())) {
    // Recomputation (after preemption): the decided depths.
    for (int32_t j = 0; j < num_tokens; ++j) {
      plan->depth.push_back(seq.lazy.DepthOf(seq.computed + j));
    }
  }
}

int64_t TakeLazyDecision(const ForwardOutput::Lazy& result, Sequence* seq) {
  LazyState& z = seq->lazy;
  if (z.decided() || !z.active()) return 0;
  z.depth = result.depth;
  z.stage_tokens.assign(z.stages(), 0);
  for (int32_t d : z.depth) {
    for (int32_t s = 0; s < d; ++s) ++z.stage_tokens[s];
  }
  return static_cast<int64_t>(z.depth.size()) - z.stage_tokens.back();
}

}  // namespace superpose::engine
