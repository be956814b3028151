// The part of each weight that one tensor-parallel rank holds (the Megatron split of
// ComputeShardLayout), read as float32 for any backend: the CPU backend reads into its
// matrices, the CUDA backend into a host buffer that it uploads as bf16. Every size is
// that of this rank: q_heads, kv_heads and inter of its ShardLayout.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/model/config.h"
#include "engine/model/weights.h"

namespace superpose::engine {

class ShardedWeightReader {
 public:
  // INVALID_ARGUMENT for a bad shard or shapes the shard size does not divide.
  static absl::StatusOr<ShardedWeightReader> Create(const ModelConfig& config,
                                                    const WeightSource& weights,
                                                    const Shard& shard);
  const ShardLayout& layout() const { return layout_; }

  // Rows of the vocabulary of this rank: [vocab_local, hidden] (vocab_local <= vocab_pad;
  // the rows up to vocab_pad are the caller's, zeros).
  absl::Status Embedding(float* out) const;
  // The untied LM head, rows as Embedding. NOT_FOUND when the checkpoint has none (and
  // the config does not tie it to the embedding: then the caller uses the embedding).
  absl::Status LmHead(float* out) const;
  absl::Status FinalNorm(float* out) const;  // [hidden]

  // Layer `l`, in the layout both backends compute with:
  absl::Status AttnNorm(int32_t l, float* out) const;  // [hidden]
  absl::Status MlpNorm(int32_t l, float* out) const;   // [hidden]
  // [(q_heads + 2 * kv_heads) * head_dim, hidden]: this rank's q rows, then k, then v.
  absl::Status Qkv(int32_t l, float* out) const;
  // [(q_heads + 2 * kv_heads) * head_dim], as Qkv (config.attention_bias only).
  absl::Status QkvBias(int32_t l, float* out) const;
  absl::Status QNorm(int32_t l, float* out) const;  // [head_dim] (config.qk_norm only)
  absl::Status KNorm(int32_t l, float* out) const;  // [head_dim] (config.qk_norm only)
  absl::Status O(int32_t l, float* out) const;      // [hidden, q_heads * head_dim]
  // [2 * inter, hidden]: gate rows, then up rows.
  absl::Status GateUp(int32_t l, float* out) const;
  absl::Status Down(int32_t l, float* out) const;  // [hidden, inter]

  // Element counts of the buffers above.
  int64_t qkv_rows() const;  // (q_heads + 2 * kv_heads) * head_dim

 private:
  ShardedWeightReader(const ModelConfig& config, const WeightSource& weights, const Shard& shard,
                      const ShardLayout& layout);
  // Rows [r0, r1) x cols [c0, c1) of the 2-D tensor `name` of shape [rows, cols].
  absl::Status Block(const std::string& name, int64_t rows, int64_t cols, int64_t r0, int64_t r1,
                     int64_t c0, int64_t c1, float* out) const;
  // Elements [b, e) of the 1-D tensor `name` of n elements.
  absl::Status Slice(const std::string& name, int64_t n, int64_t b, int64_t e, float* out) const;
  // The checkpoint tensor of layer l (of the layer whose weights it shares, if any).
  std::string LayerName(int32_t l, const char* tensor) const;

  const ModelConfig* config_;
  const WeightSource* weights_;
  Shard shard_;
  ShardLayout layout_;
  // This rank's rows of q (and of o's columns), of k and v, of the MLP columns.
  int64_t q0_ = 0, q1_ = 0, k0_ = 0, k1_ = 0, i0_ = 0, i1_ = 0;
};

}  // namespace superpose::engine
