#include "engine/cpu/quant_weights.h"

#include "absl/strings/str_cat.h"
#include "engine/model/quant_checkpoint.h"
#include "engine/model/quantize.h"
#include "engine/util/status.h"

namespace superpose::engine::cpu {

QuantWeightReader::QuantWeightReader(const ModelConfig& config, const WeightSource& weights,
                                     const Shard& shard, const ShardLayout& layout,
                                     WeightQuant kind)
    : config_(&config), weights_(&weights), layout_(layout), kind_(kind) {
  const int64_t D = config.head_dim;
  q0_ = static_cast<int64_t>(shard.rank) * layout.q_heads * D;
  q1_ = q0_ + static_cast<int64_t>(layout.q_heads) * D;
  k0_ = static_cast<int64_t>(layout.kv_head_begin) * D;
  k1_ = k0_ + static_cast<int64_t>(layout.kv_heads) * D;
  i0_ = static_cast<int64_t>(shard.rank) * layout.inter;
  i1_ = i0_ + layout.inter;
}

std::string QuantWeightReader::LayerName(int32_t l, const char* tensor) const {
  return absl::StrCat("model.layers.", config_->WeightLayer(l), ".", tensor);
}

absl::StatusOr<QuantizedTensor> QuantWeightReader::Get(const std::string& base, int64_t rows,
                                                       int64_t cols) const {
  if (HasQuantized(*weights_, base)) return ReadQuantized(*weights_, base, kind_, rows, cols);
  return ReadAndQuantize(*weights_, base + ".weight", kind_, rows, cols);
}

absl::Status QuantWeightReader::Block(const std::string& base, int64_t rows, int64_t cols,
                                      int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                                      QuantMatrix* m) const {
  SP_ASSIGN_OR_RETURN(QuantizedTensor t, Get(base, rows, cols));
  absl::Status s = m->AppendBlock(t, r0, r1, c0, c1);
  if (!s.ok()) return absl::InvalidArgumentError(absl::StrCat(base, ": ", s.message()));
  return absl::OkStatus();
}

absl::Status QuantWeightReader::Qkv(int32_t l, QuantMatrix* m) const {
  const int64_t H = config_->hidden_size, D = config_->head_dim;
  const int64_t nq = config_->num_heads * D, nkv = config_->num_kv_heads * D;
  *m = QuantMatrix{};
  SP_RETURN_IF_ERROR(Block(LayerName(l, "self_attn.q_proj"), nq, H, q0_, q1_, 0, H, m));
  SP_RETURN_IF_ERROR(Block(LayerName(l, "self_attn.k_proj"), nkv, H, k0_, k1_, 0, H, m));
  return Block(LayerName(l, "self_attn.v_proj"), nkv, H, k0_, k1_, 0, H, m);
}

absl::Status QuantWeightReader::O(int32_t l, QuantMatrix* m) const {
  const int64_t H = config_->hidden_size, nq = int64_t{config_->num_heads} * config_->head_dim;
  *m = QuantMatrix{};
  return Block(LayerName(l, "self_attn.o_proj"), H, nq, 0, H, q0_, q1_, m);
}

absl::Status QuantWeightReader::GateUp(int32_t l, QuantMatrix* m) const {
  const int64_t H = config_->hidden_size, I = config_->intermediate_size;
  *m = QuantMatrix{};
  SP_RETURN_IF_ERROR(Block(LayerName(l, "mlp.gate_proj"), I, H, i0_, i1_, 0, H, m));
  return Block(LayerName(l, "mlp.up_proj"), I, H, i0_, i1_, 0, H, m);
}

absl::Status QuantWeightReader::Down(int32_t l, QuantMatrix* m) const {
  const int64_t H = config_->hidden_size, I = config_->intermediate_size;
  *m = QuantMatrix{};
  return Block(LayerName(l, "mlp.down_proj"), H, I, 0, H, i0_, i1_, m);
}

absl::Status QuantWeightReader::LmHead(QuantMatrix* m) const {
  const int64_t V = config_->vocab_size, H = config_->hidden_size;
  const int64_t b = layout_.vocab_begin, e = b + layout_.vocab_local;
  *m = QuantMatrix{};
  SP_RETURN_IF_ERROR(Block("lm_head", V, H, b, e, 0, H, m));
  // Padding rows (their logits are never read): codes 0, scale 0 / table set 0.
  const int32_t pad = layout_.vocab_pad - layout_.vocab_local;
  m->codes.resize(m->codes.size() + static_cast<size_t>(pad) * m->row_bytes(), 0);
  if (m->kind == WeightQuant::kInt8) m->scales.resize(m->scales.size() + pad, 0.0f);
  if (m->kind == WeightQuant::kQ4) m->lut_set.resize(m->lut_set.size() + pad, 0);
  m->out += pad;
  return absl::OkStatus();
}

}  // namespace superpose::engine::cpu
