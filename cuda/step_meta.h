// The host side of a CUDA step: everything the kernels need to know about a BatchPlan,
// packed into one int32 array that is uploaded with a single copy. No CUDA includes,
// so it is unit-tested on any machine.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "cuda/attn_tile.h"
#include "engine/backend.h"

namespace superpose::cuda {

struct StepMeta {
  // tokens [T] | positions [T] (float bits) | slots [T] (block * block_size + slot) |
  // keys (per sequence with new tokens: its context segments' slots, then its new
  // tokens' slots) | tiles | logits rows [R] | logprob rows [NL] | logprob targets [NL]
  std::vector<int32_t> words;
  size_t off_pos = 0, off_slots = 0, off_keys = 0, off_tiles = 0, off_rows = 0, off_lp_row = 0,
         off_lp_target = 0;
  int32_t num_tiles = 0;
  int32_t tile_tokens = 1;  // 1 when every sequence has at most one new token (decode)
  // Rows of the logits matrix: plan.logits_for, then the extra rows logprobs need.
  std::vector<int32_t> rows;
  int32_t num_logprobs = 0;
  // LoRA segments (cuda/lora_segments.h), appended after the words above when the step
  // has adapters (CudaBackend::Impl::PrepareLora); none: 0.
  size_t off_lora = 0;
  int32_t num_lora_segs = 0;
};

// The layout of a decode step's metadata as a CUDA graph reads it: tokens [T] |
// positions [T] | slots [T] | tiles [T] (5 words each) | keys. Every offset depends on T
// alone, so the device pointers baked into a graph captured for T tokens stay right
// whatever the lengths of the contexts (only the keys' count varies, at the end).
struct DecodeLayout {
  size_t off_pos, off_slots, off_tiles, off_keys;
};
inline DecodeLayout DecodeMetaLayout(int32_t T) {
  const size_t t = static_cast<size_t>(T);
  return DecodeLayout{t, 2 * t, 3 * t, 8 * t};
}
static_assert(sizeof(AttnTile) == 5 * sizeof(int32_t), "DecodeMetaLayout: 5 words per tile");

// Words of the decode layout for `m`: 8 * T + keys.
size_t DecodeMetaWords(const StepMeta& m, int32_t T);

// Rearranges `m`, built by BuildStepMeta from a plan of T tokens in which every sequence
// has exactly one new token, into the decode layout at dst (DecodeMetaWords(m, T)
// words). INVALID_ARGUMENT when `m` is not such a step (tiles of more than one token, or
// not one tile per token). The tiles' key offsets are relative to the keys, which only
// move, so they stay valid.
absl::Status PackDecodeMeta(const StepMeta& m, int32_t T, int32_t* dst);

// `plan` must have passed engine::ValidatePlan. Sequences with more than one new token
// are cut into tiles of up to `max_tile_tokens` tokens.
absl::StatusOr<StepMeta> BuildStepMeta(const engine::BatchPlan& plan, int32_t block_size,
                                       int32_t max_tile_tokens);

}  // namespace superpose::cuda
