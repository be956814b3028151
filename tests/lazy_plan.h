// LazyLLM prefill plans for the backend tests (CPU and CUDA): a prompt at blocks
// [block0, ...) of 16 slots, each stage compact (its k-th token at the k-th own slot,
// LazyPlan::stage_slots), with a logits row for the last token.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "engine/backend.h"

namespace superpose::testing {

inline engine::KvSlot LazySlot(int32_t block0, int32_t i) { return {block0 + i / 16, i % 16}; }

// A deciding (`keep`) or replaying (`depth`) schedule without a context.
inline engine::LazyPlan LazySchedule(std::vector<int32_t> boundaries, std::vector<float> keep,
                                     std::vector<int32_t> depth = {}) {
  engine::LazyPlan z;
  z.stage_context.resize(boundaries.size());
  z.boundaries = std::move(boundaries);
  z.keep = std::move(keep);
  z.depth = std::move(depth);
  return z;
}

inline void AddLazyPrefill(const std::vector<int32_t>& prompt, int32_t block0,
                           engine::LazyPlan lazy, engine::BatchPlan* plan, int64_t adapter = 0) {
  engine::SeqPlan s;
  s.id = static_cast<engine::SeqId>(plan->seqs.size());
  s.token_begin = plan->num_tokens();
  s.num_tokens = static_cast<int32_t>(prompt.size());
  s.adapter = adapter;
  s.lazy = std::move(lazy);
  for (size_t i = 0; i < prompt.size(); ++i) {
    plan->tokens.push_back(prompt[i]);
    plan->positions.push_back(static_cast<float>(i));
    plan->kv_slots.push_back(LazySlot(block0, static_cast<int32_t>(i)));
  }
  for (size_t st = 0; st < s.lazy.boundaries.size(); ++st) {
    std::vector<engine::KvSlot>& slots = s.lazy.stage_slots.emplace_back();
    for (size_t j = 0; j < prompt.size(); ++j) {
      if (s.lazy.depth.empty() ||
          (j < s.lazy.depth.size() && s.lazy.depth[j] > static_cast<int32_t>(st) + 1)) {
        slots.push_back(LazySlot(block0, static_cast<int32_t>(slots.size())));
      }
    }
  }
  plan->logits_for.push_back(plan->num_tokens() - 1);
  plan->seqs.push_back(std::move(s));
}

// The decode step after a pruned prefill of depth.size() tokens at blocks [block0, ...)
// (its depths): `token` at the next position and slot; every stage st holds, compactly,
// the prompt tokens that reached it (LazyPlan::stage_context) and takes the new token at
// the next own slot.
inline engine::BatchPlan LazyDecodeStep(const std::vector<int32_t>& boundaries,
                                        const std::vector<int32_t>& depth, int32_t token,
                                        int32_t block0 = 0) {
  const int32_t n_prompt = static_cast<int32_t>(depth.size());
  const auto segments = [&](int32_t n) {
    std::vector<engine::KvSegment> ctx;
    for (int32_t i = 0; i < n; i += 16) ctx.push_back({block0 + i / 16, 0, std::min(16, n - i)});
    return ctx;
  };
  engine::SeqPlan s;
  s.num_tokens = 1;
  s.context = segments(n_prompt);
  s.lazy.boundaries = boundaries;
  for (int32_t st = 1; st <= static_cast<int32_t>(boundaries.size()); ++st) {
    int32_t n = 0;
    for (int32_t d : depth) n += d > st;
    s.lazy.stage_context.push_back(segments(n));
    s.lazy.stage_slots.push_back({LazySlot(block0, n)});
  }
  engine::BatchPlan step;
  step.seqs.push_back(std::move(s));
  step.tokens = {token};
  step.positions = {static_cast<float>(n_prompt)};
  step.kv_slots = {LazySlot(block0, n_prompt)};
  step.logits_for = {0};
  return step;
}

}  // namespace superpose::testing
