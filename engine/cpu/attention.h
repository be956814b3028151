// The CPU backend's paged attention: one kernel for decode tokens and prefill chunks.
//
// Keys are stored transposed within a block: K[block][kv_head][d][slot], so the 16 (or
// fewer) keys of a run of slots load as one vector per dimension, and a key's score is a
// plain fused multiply-add chain over d in its own lane: s = fma(q[d], k[d], s) for d =
// 0..D-1 from s = 0. Softmax and the weighted sum of values are likewise fixed per query
// (values summed in key order). No step depends on which other queries share the call,
// so a token's attention output is bitwise the same whether it is decoded alone, in a
// batch, or recomputed in a prefill chunk of any length (after preemption or a partial
// prefix-cache hit): batched == solo holds exactly, whatever the weights' dtype.
// Written once with Google Highway: Attend runs on the best SIMD target of the CPU
// (engine/simd.h), N = 4, 8 or 16 lanes (a run of 16 keys is 16 / N vectors); results are
// fixed per target and differ between targets by rounding only.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace superpose::engine::cpu {

// Keys of one sequence in attention order (context, then its new tokens).
struct AttnKeys {
  struct Run {      // consecutive slots of one block: at most 16 keys
    int64_t block;  // block id
    int32_t slot0;  // first slot
    int32_t len;    // 1..16
    int32_t pos;    // index of the first key in the sequence's key order
  };
  std::vector<int64_t> slots;  // block * block_size + slot of every key
  std::vector<Run> runs;

  void Clear() {
    slots.clear();
    runs.clear();
  }
  // Appends `len` keys at consecutive slots of `block` (split into runs of <= 16,
  // merged with the previous run when it continues it).
  void Append(int64_t block, int32_t slot0, int32_t len, int32_t block_size);
};

// One layer's KV pool. K: [num_blocks][kv_heads][D][block_size].
// V: [num_blocks * block_size][kv_heads][D]. Elements are float, or bfloat16 (uint16_t
// bit patterns, widened exactly to float on load) when `bf16`.
struct KvLayerView {
  const void* k;
  const void* v;
  int32_t kv_heads, head_dim, block_size;
  bool bf16 = false;
};

// Per-thread buffers, reused across calls.
struct AttnScratch {
  std::vector<float> scores;
  std::vector<float> inv;
  std::vector<float> spill;  // copies of partial runs' keys
};

// Attention of n queries that share kv head `kvh` of one sequence: query i sees keys
// [0, nks[i]) of `keys`; outs[i] = softmax(q_i . k * scale) . v. Any n >= 1.
void Attend(const KvLayerView& kv, int32_t kvh, const AttnKeys& keys, int32_t n,
            const float* const* qs, const int32_t* nks, float scale, float* const* outs,
            AttnScratch* scratch);

// The SIMD target Attend runs on now (Highway's name: "AVX3", "AVX2", "SSE4", "NEON",
// "EMU128" or "SCALAR"); engine::simd::LimitTargets caps it.
std::string AttnKernelName();

// Index of element d of the key at (block, slot), kv head kvh, in a layer's K array.
inline int64_t KeyElement(int64_t block, int32_t slot, int32_t kvh, int32_t d, int32_t kv_heads,
                          int32_t head_dim, int32_t block_size) {
  return ((block * kv_heads + kvh) * head_dim + d) * block_size + slot;
}

}  // namespace superpose::engine::cpu
