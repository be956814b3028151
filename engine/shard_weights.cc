#include "engine/shard_weights.h"

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/model/quantize.h"
#include "engine/util/status.h"

namespace superpose::engine {

absl::StatusOr<ShardedWeightReader> ShardedWeightReader::Create(const ModelConfig& config,
                                                                const WeightSource& weights,
                                                                const Shard& shard) {
  if (shard.size < 1 || shard.rank < 0 || shard.rank >= shard.size) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad shard: rank ", shard.rank, " of ", shard.size));
  }
  absl::StatusOr<ShardLayout> layout = ComputeShardLayout(config, shard);
  if (!layout.ok()) return layout.status();
  return ShardedWeightReader(config, weights, shard, *layout);
}

ShardedWeightReader::ShardedWeightReader(const ModelConfig& config, const WeightSource& weights,
                                         const Shard& shard, const ShardLayout& layout)
    : config_(&config), weights_(&weights), shard_(shard), layout_(layout) {
  const int64_t D = config.head_dim;
  q0_ = static_cast<int64_t>(shard.rank) * layout.q_heads * D;
  q1_ = q0_ + static_cast<int64_t>(layout.q_heads) * D;
  k0_ = static_cast<int64_t>(layout.kv_head_begin) * D;
  k1_ = k0_ + static_cast<int64_t>(layout.kv_heads) * D;
  i0_ = static_cast<int64_t>(shard.rank) * layout.inter;
  i1_ = i0_ + layout.inter;
}

int64_t ShardedWeightReader::qkv_rows() const { return (q1_ - q0_) + 2 * (k1_ - k0_); }

std::string ShardedWeightReader::LayerName(int32_t l, const char* tensor) const {
  return absl::StrCat("model.layers.", config_->WeightLayer(l), ".", tensor);
}

absl::Status ShardedWeightReader::Block(const std::string& name, int64_t rows, int64_t cols,
                                        int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                                        float* out) const {
  // A quantized checkpoint read as float (engine/model/quantize.h): its dequantized values.
  if (config_->quantization != WeightQuant::kNone && !weights_->Has(name) &&
      HasQuantized(*weights_, QuantBaseName(name))) {
    return ReadDequantizedBlock(*weights_, QuantBaseName(name), config_->quantization, rows, cols,
                                r0, r1, c0, c1, out);
  }
  return weights_->ReadF32Block(name, {rows, cols}, r0, r1, c0, c1, out);
}

absl::Status ShardedWeightReader::Slice(const std::string& name, int64_t n, int64_t b, int64_t e,
                                        float* out) const {
  if (b == 0 && e == n) return weights_->ReadF32(name, {n}, out);
  std::vector<float> full(static_cast<size_t>(n));
  SP_RETURN_IF_ERROR(weights_->ReadF32(name, {n}, full.data()));
  std::copy(full.begin() + b, full.begin() + e, out);
  return absl::OkStatus();
}

absl::Status ShardedWeightReader::Embedding(float* out) const {
  const int64_t b = layout_.vocab_begin, e = b + layout_.vocab_local;
  return Block("model.embed_tokens.weight", config_->vocab_size, config_->hidden_size, b, e, 0,
               config_->hidden_size, out);
}

absl::Status ShardedWeightReader::LmHead(float* out) const {
  if (!weights_->Has("lm_head.weight")) {
    return absl::NotFoundError(
        config_->tie_word_embeddings
            ? "tensor 'lm_head.weight' missing (tie_word_embeddings: use the embedding)"
            : "tensor 'lm_head.weight' missing and tie_word_embeddings is false");
  }
  const int64_t b = layout_.vocab_begin, e = b + layout_.vocab_local;
  return Block("lm_head.weight", config_->vocab_size, config_->hidden_size, b, e, 0,
               config_->hidden_size, out);
}

absl::Status ShardedWeightReader::FinalNorm(float* out) const {
  return weights_->ReadF32("model.norm.weight", {config_->hidden_size}, out);
}

absl::Status ShardedWeightReader::AttnNorm(int32_t l, float* out) const {
  return weights_->ReadF32(LayerName(l, "input_layernorm.weight"), {config_->hidden_size}, out);
}

absl::Status ShardedWeightReader::MlpNorm(int32_t l, float* out) const {
  return weights_->ReadF32(LayerName(l, "post_attention_layernorm.weight"), {config_->hidden_size},
                           out);
}

absl::Status ShardedWeightReader::Qkv(int32_t l, float* out) const {
  const int64_t H = config_->hidden_size, D = config_->head_dim;
  const int64_t nq = config_->num_heads * D, nkv = config_->num_kv_heads * D;
  SP_RETURN_IF_ERROR(Block(LayerName(l, "self_attn.q_proj.weight"), nq, H, q0_, q1_, 0, H, out));
  out += (q1_ - q0_) * H;
  SP_RETURN_IF_ERROR(Block(LayerName(l, "self_attn.k_proj.weight"), nkv, H, k0_, k1_, 0, H, out));
  out += (k1_ - k0_) * H;
  return Block(LayerName(l, "self_attn.v_proj.weight"), nkv, H, k0_, k1_, 0, H, out);
}

absl::Status ShardedWeightReader::QkvBias(int32_t l, float* out) const {
  const int64_t D = config_->head_dim;
  const int64_t nq = config_->num_heads * D, nkv = config_->num_kv_heads * D;
  SP_RETURN_IF_ERROR(Slice(LayerName(l, "self_attn.q_proj.bias"), nq, q0_, q1_, out));
  out += q1_ - q0_;
  SP_RETURN_IF_ERROR(Slice(LayerName(l, "self_attn.k_proj.bias"), nkv, k0_, k1_, out));
  out += k1_ - k0_;
  return Slice(LayerName(l, "self_attn.v_proj.bias"), nkv, k0_, k1_, out);
}

absl::Status ShardedWeightReader::QNorm(int32_t l, float* out) const {
  return weights_->ReadF32(LayerName(l, "self_attn.q_norm.weight"), {config_->head_dim}, out);
}

absl::Status ShardedWeightReader::KNorm(int32_t l, float* out) const {
  return weights_->ReadF32(LayerName(l, "self_attn.k_norm.weight"), {config_->head_dim}, out);
}

absl::Status ShardedWeightReader::O(int32_t l, float* out) const {
  const int64_t H = config_->hidden_size, nq = int64_t{config_->num_heads} * config_->head_dim;
  return Block(LayerName(l, "self_attn.o_proj.weight"), H, nq, 0, H, q0_, q1_, out);
}

absl::Status ShardedWeightReader::GateUp(int32_t l, float* out) const {
  const int64_t H = config_->hidden_size, I = config_->intermediate_size;
  SP_RETURN_IF_ERROR(Block(LayerName(l, "mlp.gate_proj.weight"), I, H, i0_, i1_, 0, H, out));
  return Block(LayerName(l, "mlp.up_proj.weight"), I, H, i0_, i1_, 0, H, out + (i1_ - i0_) * H);
}

absl::Status ShardedWeightReader::Down(int32_t l, float* out) const {
  const int64_t H = config_->hidden_size, I = config_->intermediate_size;
  return Block(LayerName(l, "mlp.down_proj.weight"), H, I, 0, H, i0_, i1_, out);
}

}  // namespace superpose::engine
