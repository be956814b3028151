// The engine's side of LazyLLM (docs/architecture.md "LazyLLM"): which sequences prune,
// what their steps ask of the backend (LazyPlan) and what they keep of its decisions.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "engine/backend.h"
#include "engine/lazy.h"
#include "engine/sequence/sequence.h"

namespace superpose::engine {

struct LazyEngineOptions {
  // The schedule of requests that do not choose (mode kOff or kOn; kOn with empty
  // arrays takes the paper's schedule for the model).
  LazyOptions default_schedule;
  int32_t min_prompt = 1024;  // shorter prompts run without pruning
  // Bytes the running sequences' Aux Caches may take (a float per hidden unit and prompt
  // token, on each tensor-parallel rank): a sequence that would pass it decodes without
  // revival (its prefill still prunes).
  int64_t aux_budget_bytes = int64_t{256} << 20;
};

// A request's schedule resolved against the server default, the model and the backend:
// INVALID_ARGUMENT naming the field, UNIMPLEMENTED when the request asks for lazy (or for
// lazy.revive) and the backend cannot (a default the backend cannot run is dropped
// silently).
absl::Status ResolveRequestLazy(const LazyEngineOptions& options, int32_t num_layers,
                                bool backend_supports, bool backend_revives, LazyOptions* lazy);

// A new plain sequence's lazy state from its resolved schedule: applied, or skipped
// with the reason (too short, longer than a step's `max_batch_tokens`). Lazy sequences
// reuse a cached prefix as computed (in every stage, never pruned) but publish nothing
// (their own blocks hold the stages compacted): seq->publishes_prefix is cleared.
void StartLazySequence(const LazyOptions& lazy, int32_t min_prompt, int32_t max_batch_tokens,
                       Sequence* seq);

// A sequence whose undecided prefill is not scheduled whole this step runs without
// pruning from now on (the decision needs the whole prompt in one step).
void DropChunkedLazy(Sequence* seq, int32_t num_tokens);

// seq's LazyPlan for a step of `num_tokens` new tokens (block size `bs`).
void FillLazyPlan(const Sequence& seq, int32_t num_tokens, int32_t bs, LazyPlan* plan);

// Takes the backend's decision for a sequence's first prefill (before seq->computed
// advances past it); returns the prompt tokens it pruned (0 for a replay).
int64_t TakeLazyDecision(const ForwardOutput::Lazy& result, Sequence* seq);

// Revival mode: records a decode step's entries (the revived tokens, then the step's
// own token, in each stage past the first) before seq->computed advances; returns the
// tokens revived. A replay's result records nothing.
int64_t TakeLazyRevival(const ForwardOutput::Lazy& result, Sequence* seq);

// Revival mode: a recomputation replays only the recorded tokens in a step (the next
// token is a decode step of its own, which selects and revives): caps *num_tokens.
void CapLazyReplay(const Sequence& seq, int32_t* num_tokens);

}  // namespace superpose::engine
