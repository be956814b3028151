#include "engine/runtime/step_plan.h"

#include <algorithm>

#include "engine/runtime/lazy_steps.h"
#include "engine/runtime/sampler.h"

namespace superpose::engine {

void AppendOwnSegments(const Sequence& seq, int32_t n, int32_t bs, std::vector<KvSegment>* out) {
  for (int32_t i = 0; i < n;) {
    const int32_t st = StorageIndex(seq.gap_at, bs, i);
    const int32_t slot = st % bs;
    int32_t len = std::min(bs - slot, n - i);
    if (seq.gap_at >= 0 && i < seq.gap_at) len = std::min(len, seq.gap_at - i);
    out->push_back({seq.blocks[st / bs], slot, len});
    i += len;
  }
}

KvSlot OwnSlot(const Sequence& seq, int32_t i, int32_t bs) {
  const int32_t st = StorageIndex(seq.gap_at, bs, i);
  return {seq.blocks[st / bs], st % bs};
}

namespace {

// How an emitting sequence's row comes back: whole, compact (its best `top` tokens)
// or drawn by the backend.
void ChooseRow(const Sequence& seq, const StepPlanOptions& o, int32_t* top, RowSampling* rs) {
  *top = 0;
  *rs = RowSampling{};
  if (!seq.emits || !o.compact_logits) return;
  const SamplingOptions& so = seq.req.sampling;
  const int32_t lp_top =
      seq.req.logprobs ? std::min(std::max(1, seq.req.top_logprobs), o.vocab_size) : 0;
  if (o.backend_samples && BackendCanSample(so, o.vocab_size) && lp_top <= kMaxTopLogits) {
    // The backend draws the token (draw index = tokens generated so far, so that a
    // recomputed sequence draws the same); the compact row is for logprobs.
    *rs = RowSampling{so.temperature, so.top_p, so.min_p, so.seed, seq.generated};
    *top = lp_top;
  } else {
    *top = TopLogitsNeeded(so, seq.req.logprobs, seq.req.top_logprobs, o.vocab_size);
  }
}

// Appends seq's new tokens to the plan (and the log-probabilities a scored sequence
// asks for: every within-segment next-token prediction).
void AppendTokens(const Sequence& seq, int32_t num_tokens, int32_t bs, BatchPlan* plan) {
  const int32_t total = static_cast<int32_t>(seq.tokens.size());
  for (int32_t j = 0; j < num_tokens; ++j) {
    const int32_t i = seq.computed + j;
    plan->tokens.push_back(seq.tokens[i]);
    plan->positions.push_back(seq.PositionOf(i));
    plan->kv_slots.push_back(OwnSlot(seq, i, bs));
    if (seq.scored && i + 1 < total && i + 1 != seq.segment_start) {
      plan->logprobs.push_back({plan->num_tokens() - 1, seq.tokens[i + 1]});
    }
  }
}

}  // namespace

StepPlan BuildStepPlan(const std::vector<std::pair<Sequence*, int32_t>>& scheduled,
                       const StepPlanOptions& options) {
  StepPlan sp;
  BatchPlan& plan = sp.plan;
  const int32_t bs = options.block_size;
  for (const auto& [seq, num_tokens] : scheduled) {
    StepEntry e;
    e.seq = seq;
    e.num_tokens = num_tokens;
    SeqPlan p;
    p.id = static_cast<SeqId>(seq->handle);
    p.context = seq->ctx;
    AppendOwnSegments(*seq, seq->computed, bs, &p.context);
    p.token_begin = plan.num_tokens();
    e.token_begin = p.token_begin;
    p.num_tokens = num_tokens;
    p.adapter = seq->req.adapter_key();
    FillLazyPlan(*seq, num_tokens, bs, &p.lazy);
    e.lp_begin = static_cast<int32_t>(plan.logprobs.size());
    AppendTokens(*seq, num_tokens, bs, &plan);
    e.lp_end = static_cast<int32_t>(plan.logprobs.size());
    if (e.completes() && (seq->emits || seq->wants_last_row)) {
      e.logits_row = static_cast<int32_t>(plan.logits_for.size());
      plan.logits_for.push_back(plan.num_tokens() - 1);
      int32_t top;
      RowSampling rs;
      ChooseRow(*seq, options, &top, &rs);
      plan.logits_top.push_back(top);
      plan.sampling.push_back(rs);
    }
    plan.seqs.push_back(std::move(p));
    sp.entries.push_back(e);
  }
  return sp;
}

}  // namespace superpose::engine
