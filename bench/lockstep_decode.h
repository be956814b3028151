// Lock-step greedy decode of a batch straight on a backend (no engine): the timing loop
// decode_bench and lora_bench share.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "bench/bench_util.h"
#include "engine/backend.h"

namespace superpose::bench {

constexpr int32_t kDecodeBlock = 16;  // tokens per KV block (the backend's kv_block_size)
constexpr int32_t kDecodeWarmup = 4;  // untimed steps before the timed ones

// KV blocks each sequence needs for `steps` timed steps.
inline int32_t DecodeBlocksPerSeq(int32_t steps) {
  return (steps + kDecodeWarmup + kDecodeBlock - 1) / kDecodeBlock;
}

// Decodes `steps` tokens (after kDecodeWarmup untimed ones) for each sequence in
// lock-step, greedily from a 1-token prompt; sequence i uses adapter adapters[i] (0:
// none; one per sequence). Returns the seconds of the timed steps.
inline absl::StatusOr<double> TimeLockstepDecode(engine::Backend& backend, int32_t vocab,
                                                 const std::vector<int64_t>& adapters,
                                                 int32_t steps) {
  const int32_t batch = static_cast<int32_t>(adapters.size());
  const int32_t blocks_per_seq = DecodeBlocksPerSeq(steps);
  engine::ForwardOutput out;
  engine::BatchPlan plan;
  plan.seqs.resize(batch);
  plan.tokens.resize(batch);
  plan.positions.resize(batch);
  plan.kv_slots.resize(batch);
  plan.logits_for.resize(batch);
  for (int32_t i = 0; i < batch; ++i) {
    plan.seqs[i].id = i;
    plan.seqs[i].token_begin = i;
    plan.seqs[i].num_tokens = 1;
    plan.seqs[i].adapter = adapters[i];
    plan.logits_for[i] = i;
    plan.tokens[i] = 1 + i;
  }
  double t0 = 0;
  for (int32_t s = 0; s < steps + kDecodeWarmup; ++s) {
    if (s == kDecodeWarmup) t0 = NowS();
    for (int32_t i = 0; i < batch; ++i) {
      const int32_t base = i * blocks_per_seq;
      plan.kv_slots[i] = {base + s / kDecodeBlock, s % kDecodeBlock};
      plan.positions[i] = static_cast<float>(s);
      // Context: everything this sequence computed before this step.
      plan.seqs[i].context.clear();
      for (int32_t done = 0, b = 0; done < s; ++b) {
        const int32_t len = std::min(kDecodeBlock, s - done);
        plan.seqs[i].context.push_back({base + b, 0, len});
        done += len;
      }
    }
    if (auto st = backend.Forward(plan, &out); !st.ok()) return st;
    for (int32_t i = 0; i < batch; ++i) {
      const float* row = out.logits.data() + static_cast<size_t>(i) * vocab;
      plan.tokens[i] = static_cast<int32_t>(std::max_element(row, row + vocab) - row);
    }
  }
  return NowS() - t0;
}

}  // namespace superpose::bench
