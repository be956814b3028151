// libFuzzer target: config.json (ParseModelConfig) and generation_config.json
// (MergeGenerationConfig) on arbitrary bytes. Invariants:
//   - an error is INVALID_ARGUMENT and names the file;
//   - an accepted config is consistent (the checks the backends rely on: positive sizes,
//     even head_dim, kv heads dividing heads, finite positive eps/theta/rope factors),
//     its derived numbers (parameter count, RoPE frequencies) are well defined, and it
//     survives ModelConfigToJson -> ParseModelConfig unchanged;
//   - merging generation_config.json never drops eos ids and keeps ids when it fails.
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>

#include "engine/model/config.h"
#include "fuzz/fuzz_util.h"

namespace superpose::fuzz {
namespace {

using engine::ModelConfig;
using engine::RopeScaling;

const std::string kSource = "/fuzz/config.json";

void CheckError(const absl::Status& st, const std::string& source) {
  FUZZ_CHECK(st.code() == absl::StatusCode::kInvalidArgument);
  FUZZ_CHECK(std::string(st.message()).rfind(source, 0) == 0);
}

void CheckConsistent(const ModelConfig& c) {
  FUZZ_CHECK(c.hidden_size > 0 && c.intermediate_size > 0 && c.num_layers > 0);
  FUZZ_CHECK(c.num_heads > 0 && c.num_kv_heads > 0 && c.num_heads % c.num_kv_heads == 0);
  FUZZ_CHECK(c.head_dim > 0 && c.head_dim % 2 == 0);
  FUZZ_CHECK(c.vocab_size > 0 && c.max_position_embeddings > 0);
  FUZZ_CHECK(std::isfinite(c.rms_norm_eps) && c.rms_norm_eps > 0);
  FUZZ_CHECK(std::isfinite(c.rope_theta) && c.rope_theta > 0);
  const RopeScaling& rs = c.rope_scaling;
  if (rs.type != RopeScaling::Type::kNone) {
    FUZZ_CHECK(std::isfinite(rs.factor) && rs.factor > 0);
  }
  if (rs.type == RopeScaling::Type::kLlama3) {
    FUZZ_CHECK(std::isfinite(rs.low_freq_factor) && rs.low_freq_factor > 0);
    FUZZ_CHECK(std::isfinite(rs.high_freq_factor) && rs.high_freq_factor > rs.low_freq_factor);
    FUZZ_CHECK(rs.original_max_position_embeddings > 0);
  }
  FUZZ_CHECK(!c.architecture.empty() && !c.model_type.empty());
}

bool SameConfig(const ModelConfig& a, const ModelConfig& b) {
  const RopeScaling &x = a.rope_scaling, &y = b.rope_scaling;
  return a.architecture == b.architecture && a.model_type == b.model_type &&
         a.hidden_size == b.hidden_size && a.intermediate_size == b.intermediate_size &&
         a.num_layers == b.num_layers && a.num_heads == b.num_heads &&
         a.num_kv_heads == b.num_kv_heads && a.head_dim == b.head_dim &&
         a.vocab_size == b.vocab_size && a.max_position_embeddings == b.max_position_embeddings &&
         a.rms_norm_eps == b.rms_norm_eps && a.rope_theta == b.rope_theta && x.type == y.type &&
         x.factor == y.factor && x.low_freq_factor == y.low_freq_factor &&
         x.high_freq_factor == y.high_freq_factor &&
         x.original_max_position_embeddings == y.original_max_position_embeddings &&
         a.attention_bias == b.attention_bias && a.qk_norm == b.qk_norm &&
         a.tie_word_embeddings == b.tie_word_embeddings && a.dtype == b.dtype &&
         a.bos_token_id == b.bos_token_id && a.eos_token_ids == b.eos_token_ids &&
         a.pad_token_id == b.pad_token_id;
}

void FuzzConfig(std::string_view text) {
  absl::StatusOr<ModelConfig> c = engine::ParseModelConfig(text, kSource);
  if (!c.ok()) {
    CheckError(c.status(), kSource);
    return;
  }
  CheckConsistent(*c);
  FUZZ_CHECK(c->NumParameters() > 0);
  FUZZ_CHECK(c->WeightBytes(engine::DType::kBF16) > 0);
  const std::vector<float> inv = engine::RopeInvFreq(*c);
  FUZZ_CHECK(inv.size() == static_cast<size_t>(c->head_dim / 2));
  for (float f : inv) FUZZ_CHECK(!std::isnan(f));
  absl::StatusOr<ModelConfig> again =
      engine::ParseModelConfig(engine::ModelConfigToJson(*c), "/fuzz/again.json");
  FUZZ_CHECK(again.ok());
  FUZZ_CHECK(SameConfig(*c, *again));
}

void FuzzGenerationConfig(std::string_view text) {
  ModelConfig c;
  c.bos_token_id = -1;
  c.eos_token_ids = {2};
  const ModelConfig before = c;
  const std::string source = "/fuzz/generation_config.json";
  absl::Status st = engine::MergeGenerationConfig(text, source, &c);
  if (!st.ok()) {
    CheckError(st, source);
    FUZZ_CHECK(SameConfig(c, before));
    return;
  }
  FUZZ_CHECK(!c.eos_token_ids.empty() && c.eos_token_ids[0] == 2);
  for (size_t i = 0; i < c.eos_token_ids.size(); ++i) {
    for (size_t k = 0; k < i; ++k) FUZZ_CHECK(c.eos_token_ids[i] != c.eos_token_ids[k]);
  }
}

}  // namespace
}  // namespace superpose::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 64 * 1024) return 0;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  superpose::fuzz::FuzzConfig(text);
  superpose::fuzz::FuzzGenerationConfig(text);
  return 0;
}
