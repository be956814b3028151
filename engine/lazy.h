// LazyLLM dynamic token pruning (papers.md section 2): the per-request schedule, its
// checks, the default schedule and the deterministic top-k that both the backends and
// the tests use. Device-agnostic; the CPU forward is engine/cpu/lazy_forward.cc.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace superpose::engine {

struct BatchPlan;
struct KvPoolInfo;

// A request's LazyLLM schedule. Boundary layers are 0-based: the tokens pruned at
// boundary b are not computed by layers b + 1 and deeper. keep[s] is the fraction of the
// previous stage's prompt tokens (the last one aside, which is always kept) that stage
// s + 1 keeps.
struct LazyOptions {
  enum class Mode { kDefault, kOff, kOn };
  Mode mode = Mode::kDefault;  // kDefault: the server's --lazy_default
  std::vector<int32_t> boundaries;
  std::vector<float> keep;
  // Decode-time revival (papers.md 2.2): every decode step's token selects the best
  // keep[s] of stage s's keys and revives the selected tokens that lack K/V in stage
  // s + 1 from the Aux Cache. Off: the prefill's decision is kept (the paper's TTFT mode).
  bool revive = false;
  bool revive_set = false;  // the request chose `revive` (else the server's default)
};

// The keep fraction of the paper's proposal (70% of the previous stage per boundary).
inline constexpr float kLazyPaperKeep = 0.7f;

// papers.md 2.5's proposal: prune after layers round(0.29L), round(0.6L), round(0.88L)
// (1-based; 9/19/28 for L = 32), keeping 70% each time; duplicates (small L) dropped.
// Returns the schedule as 0-based boundaries with mode kOn.
LazyOptions PaperLazySchedule(int32_t num_layers);

// The schedule a request runs with: OFF stays off; ON with empty boundaries takes the
// paper's layers, empty keep takes 0.7 at each boundary. INVALID_ARGUMENT naming the
// field (lazy.boundary_layers[i], lazy.keep_fractions[i]) when the result is not a
// schedule for a model of `num_layers` layers: layers increasing and < num_layers,
// fractions in (0, 1], as many fractions as layers.
absl::Status ResolveLazy(int32_t num_layers, LazyOptions* lazy);

// Why a resolved ON schedule is not applied to a prompt of `prompt_len` tokens, or ""
// when it is: below `min_prompt` tokens, or longer than one step's `max_step_tokens`
// (the pruning decision needs the whole prompt in one step).
std::string LazySkipReason(int32_t prompt_len, int32_t min_prompt, int32_t max_step_tokens);

// How many of n candidates a stage keeping `keep` retains: round(keep * n), in [0, n].
int32_t LazyKeepCount(float keep, int32_t n);

// The indices of the `k` best scores (score descending, lower index first on ties), in
// increasing index order.
std::vector<int32_t> LazyTopK(absl::Span<const float> scores, int32_t k);

// Stage of layer `l` under `boundaries`: the number of boundaries below l.
int32_t LazyStageOf(absl::Span<const int32_t> boundaries, int32_t l);

// The lazy parts of a plan, for a backend of `num_layers` layers over pool `kv`
// (INVALID_ARGUMENT naming the sequence): boundaries increasing and < num_layers, one
// stage context and one list of stage slots per boundary (inside the pool; the slots
// one per new token of the stage), `keep` without `depth` and with one fraction in
// (0, 1] per boundary, `depth` one per new token in [1, stages], logits rows and logprob
// requests only on tokens computed by the last layer (with `keep`: the last new token).
absl::Status ValidateLazyPlan(const BatchPlan& plan, const KvPoolInfo& kv, int32_t num_layers);

}  // namespace superpose::engine
