#include "engine/model/flop_model.h"

namespace superpose::engine {

FlopModel::FlopModel(const ModelConfig& c) {
  const double h = c.hidden_size;
  const double q = static_cast<double>(c.num_heads) * c.head_dim;
  const double kv = static_cast<double>(c.num_kv_heads) * c.head_dim;
  const double per_layer = h * (q + 2 * kv) + q * h + 3.0 * h * c.intermediate_size;
  matmul_per_token = 2.0 * per_layer * c.num_layers;
  lm_head_per_row = 2.0 * h * c.vocab_size;
  attention_per_key = 4.0 * c.num_layers * q;
}

double FlopModel::Segment(int64_t context, int64_t n, int64_t logit_rows) const {
  // Token j (0-based) attends to context + j + 1 keys.
  const double keys = static_cast<double>(n) * context + 0.5 * static_cast<double>(n) * (n + 1);
  return matmul_per_token * n + attention_per_key * keys + lm_head_per_row * logit_rows;
}

}  // namespace superpose::engine
