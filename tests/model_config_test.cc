// config.json / generation_config.json parsing, RoPE frequencies, parameter counts.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>

#include <nlohmann/json.hpp>

#include "engine/model/config.h"

namespace superpose::engine {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

const std::string kStories = std::string(SP_SHARED_DIR) + "/fixtures/stories260k";

// A minimal valid Llama config; tests patch fields into it.
nlohmann::json BaseLlama() {
  return nlohmann::json::parse(R"({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2,
    "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1000,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
    "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2
  })");
}

absl::StatusOr<ModelConfig> Parse(const nlohmann::json& j) {
  return ParseModelConfig(j.dump(), "/models/x/config.json");
}

TEST(ModelConfigTest, Stories260kMatchesItsConfigJson) {
  auto c = LoadModelConfig(kStories);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, "LlamaForCausalLM");
  EXPECT_EQ(c->model_type, "llama");
  EXPECT_EQ(c->hidden_size, 64);
  EXPECT_EQ(c->intermediate_size, 172);
  EXPECT_EQ(c->num_layers, 5);
  EXPECT_EQ(c->num_heads, 8);
  EXPECT_EQ(c->num_kv_heads, 4);
  EXPECT_EQ(c->head_dim, 8);
  EXPECT_EQ(c->vocab_size, 512);
  EXPECT_EQ(c->max_position_embeddings, 512);
  EXPECT_FLOAT_EQ(c->rms_norm_eps, 1e-5f);
  EXPECT_FLOAT_EQ(c->rope_theta, 10000.0f);
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kNone);
  EXPECT_FALSE(c->attention_bias);
  EXPECT_FALSE(c->qk_norm);
  EXPECT_TRUE(c->tie_word_embeddings);
  EXPECT_EQ(c->dtype, DType::kF32);
  EXPECT_EQ(c->bos_token_id, 1);
  EXPECT_THAT(c->eos_token_ids, ElementsAre(2));
  EXPECT_EQ(c->pad_token_id, -1);
  // SOURCES.md: 260,032 distinct parameters; all of them are read per step (tied).
  EXPECT_EQ(c->NumParameters(), 260032);
  EXPECT_EQ(c->WeightBytes(DType::kF32), 260032 * 4);
  EXPECT_EQ(c->WeightBytes(DType::kBF16), 260032 * 2);
}

TEST(ModelConfigTest, DefaultsForOptionalFields) {
  nlohmann::json j = BaseLlama();
  j.erase("num_key_value_heads");
  j.erase("rms_norm_eps");
  j.erase("rope_theta");
  j.erase("hidden_act");
  j.erase("torch_dtype");
  j["head_dim"] = nullptr;
  j["bos_token_id"] = nullptr;
  j.erase("eos_token_id");
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_kv_heads, 8);
  EXPECT_EQ(c->head_dim, 32);
  EXPECT_FLOAT_EQ(c->rms_norm_eps, 1e-6f);
  EXPECT_FLOAT_EQ(c->rope_theta, 10000.0f);
  EXPECT_EQ(c->dtype, DType::kF32);
  EXPECT_EQ(c->bos_token_id, -1);
  EXPECT_TRUE(c->eos_token_ids.empty());
  EXPECT_FALSE(c->tie_word_embeddings);
}

TEST(ModelConfigTest, UntiedParameterCountAndWeightBytes) {
  auto c = Parse(BaseLlama());
  ASSERT_TRUE(c.ok()) << c.status();
  const int64_t H = 256, I = 688, D = 32, V = 1000;
  const int64_t layer = H * 8 * D + 2 * H * 2 * D + 8 * D * H + 3 * H * I + 2 * H;
  EXPECT_EQ(c->NumParameters(), 2 * V * H + 2 * layer + H);
  EXPECT_EQ(c->WeightBytes(DType::kBF16), (V * H + 2 * layer + H) * 2);
}

TEST(ModelConfigTest, Qwen2HasAttentionBiasAndEosList) {
  auto c = ParseModelConfig(R"({
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
    "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "use_sliding_window": false, "max_window_layers": 21,
    "tie_word_embeddings": true, "torch_dtype": "bfloat16",
    "bos_token_id": 151643, "eos_token_id": [151645, 151643], "attention_dropout": 0.0
  })",
                            "qwen2/config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, "Qwen2ForCausalLM");
  EXPECT_TRUE(c->attention_bias);
  EXPECT_FALSE(c->qk_norm);
  EXPECT_EQ(c->head_dim, 64);
  EXPECT_EQ(c->dtype, DType::kBF16);
  EXPECT_FLOAT_EQ(c->rope_theta, 1e6f);
  EXPECT_THAT(c->eos_token_ids, ElementsAre(151645, 151643));
  EXPECT_EQ(c->NumParameters(), 494032768);  // Qwen2.5-0.5B: 0.49B
}

TEST(ModelConfigTest, Qwen3HasQkNormAndExplicitHeadDim) {
  const char* kQwen3 = R"({
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
    "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000, "rope_scaling": null, "attention_bias": false,
    "sliding_window": null, "use_sliding_window": false, "tie_word_embeddings": true,
    "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645
  })";
  auto c = ParseModelConfig(kQwen3, "qwen3/config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->qk_norm);
  EXPECT_FALSE(c->attention_bias);
  EXPECT_EQ(c->head_dim, 128);               // not hidden / heads = 64
  EXPECT_EQ(c->NumParameters(), 596049920);  // Qwen3-0.6B

  nlohmann::json j = nlohmann::json::parse(kQwen3);
  j.erase("head_dim");
  auto missing = ParseModelConfig(j.dump(), "qwen3/config.json");
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(missing.status().message(), HasSubstr("qwen3/config.json: missing field 'head_dim'"));
}

TEST(ModelConfigTest, ModelTypeAloneSelectsTheArchitecture) {
  nlohmann::json j = BaseLlama();
  j.erase("architectures");
  j["model_type"] = "mistral";
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, "MistralForCausalLM");
  EXPECT_EQ(c->model_type, "mistral");
}

TEST(ModelConfigTest, MistralSlidingWindow) {
  nlohmann::json j = BaseLlama();
  j["architectures"] = {"MistralForCausalLM"};
  j["model_type"] = "mistral";
  j["sliding_window"] = nullptr;
  EXPECT_TRUE(Parse(j).ok());
  j["sliding_window"] = 2048;  // == max_position_embeddings: never applies
  EXPECT_TRUE(Parse(j).ok());
  j["sliding_window"] = 1024;
  auto c = Parse(j);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(c.status().message(), HasSubstr("/models/x/config.json"));
  EXPECT_THAT(c.status().message(), HasSubstr("'sliding_window'"));
  EXPECT_THAT(c.status().message(), HasSubstr("not supported"));
}

TEST(ModelConfigTest, Qwen2SlidingWindowOnlyWhenUsed) {
  nlohmann::json j = BaseLlama();
  j["architectures"] = {"Qwen2ForCausalLM"};
  j["model_type"] = "qwen2";
  j["sliding_window"] = 512;
  j["use_sliding_window"] = false;
  EXPECT_TRUE(Parse(j).ok());
  j["use_sliding_window"] = true;
  auto c = Parse(j);
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr("'sliding_window'"));
}

TEST(ModelConfigTest, RopeScalingTypes) {
  nlohmann::json j = BaseLlama();
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 4.0}};
  auto lin = Parse(j);
  ASSERT_TRUE(lin.ok()) << lin.status();
  EXPECT_EQ(lin->rope_scaling.type, RopeScaling::Type::kLinear);
  EXPECT_FLOAT_EQ(lin->rope_scaling.factor, 4.0f);

  j["rope_scaling"] = {{"rope_type", "llama3"},
                       {"factor", 32.0},
                       {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192}};
  auto l3 = Parse(j);
  ASSERT_TRUE(l3.ok()) << l3.status();
  EXPECT_EQ(l3->rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_FLOAT_EQ(l3->rope_scaling.factor, 32.0f);
  EXPECT_FLOAT_EQ(l3->rope_scaling.low_freq_factor, 1.0f);
  EXPECT_FLOAT_EQ(l3->rope_scaling.high_freq_factor, 4.0f);
  EXPECT_EQ(l3->rope_scaling.original_max_position_embeddings, 8192);

  j["rope_scaling"].erase("low_freq_factor");
  auto l3_missing = Parse(j);
  ASSERT_FALSE(l3_missing.ok());
  EXPECT_THAT(l3_missing.status().message(), HasSubstr("rope_scaling.low_freq_factor"));

  for (const char* unsupported : {"yarn", "dynamic", "longrope"}) {
    j["rope_scaling"] = {{"rope_type", unsupported}, {"factor", 4.0}};
    auto c = Parse(j);
    ASSERT_FALSE(c.ok()) << unsupported;
    EXPECT_THAT(c.status().message(), HasSubstr("/models/x/config.json"));
    EXPECT_THAT(c.status().message(), HasSubstr("'rope_scaling'"));
    EXPECT_THAT(c.status().message(), HasSubstr(unsupported));
  }
}

// Found by fuzz/config_fuzz: a factor beyond float range became +inf and was accepted
// (RoPE frequencies then collapse to 0, and the config no longer survives ToJson).
TEST(ModelConfigTest, RopeScalingFactorsMustBeFinite) {
  nlohmann::json j = BaseLlama();
  j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 1e300}};
  auto lin = Parse(j);
  ASSERT_FALSE(lin.ok());
  EXPECT_EQ(lin.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(lin.status().message(), HasSubstr("rope_scaling.factor"));
  j["rope_scaling"] = {{"rope_type", "llama3"},
                       {"factor", 8.0},
                       {"low_freq_factor", 1.0},
                       {"high_freq_factor", 1e39},
                       {"original_max_position_embeddings", 8192}};
  auto l3 = Parse(j);
  ASSERT_FALSE(l3.ok());
  EXPECT_THAT(l3.status().message(), HasSubstr("rope_scaling.high_freq_factor"));
  j["rope_scaling"]["high_freq_factor"] = 4.0;
  ASSERT_TRUE(Parse(j).ok());
}

// Found by fuzz/config_fuzz: each size fits int32 but the parameter count overflowed
// int64 in NumParameters (signed overflow, UB). Such configs are now rejected, and every
// accepted one has a parameter count (and weight bytes) that fits.
TEST(ModelConfigTest, SizesWhoseParameterCountOverflowsAreRejected) {
  nlohmann::json j = BaseLlama();
  j["hidden_size"] = 2147483640;
  j["num_attention_heads"] = 4;
  j["num_key_value_heads"] = 4;
  j["intermediate_size"] = 2147483647;
  auto big = Parse(j);
  ASSERT_FALSE(big.ok());
  EXPECT_EQ(big.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(big.status().message(), HasSubstr("/models/x/config.json"));
  EXPECT_THAT(big.status().message(), HasSubstr("parameters"));
  // Large but representable: accepted, and the counts are exact.
  j["hidden_size"] = 65536;
  j["intermediate_size"] = 1 << 20;
  j["vocab_size"] = 1 << 20;
  j["num_hidden_layers"] = 1024;
  auto large = Parse(j);
  ASSERT_TRUE(large.ok()) << large.status();
  const int64_t H = 65536, I = 1 << 20, V = 1 << 20, L = 1024;
  const int64_t layer = 2 * H * H + 2 * H * H + 3 * H * I + 2 * H;  // nq*D = nkv*D = H
  EXPECT_EQ(large->NumParameters(), 2 * V * H + L * layer + H);
  EXPECT_EQ(large->WeightBytes(DType::kF32), (V * H + L * layer + H) * 4);
}

TEST(ModelConfigTest, ErrorsNameTheFileAndTheField) {
  struct Case {
    const char* what;
    std::function<void(nlohmann::json&)> edit;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {"missing heads", [](nlohmann::json& j) { j.erase("num_attention_heads"); },
       "/models/x/config.json: missing field 'num_attention_heads'"},
      {"missing hidden", [](nlohmann::json& j) { j.erase("hidden_size"); },
       "/models/x/config.json: missing field 'hidden_size'"},
      {"null vocab", [](nlohmann::json& j) { j["vocab_size"] = nullptr; },
       "missing field 'vocab_size'"},
      {"string size", [](nlohmann::json& j) { j["hidden_size"] = "256"; },
       "field 'hidden_size' must be an integer"},
      {"fractional size", [](nlohmann::json& j) { j["intermediate_size"] = 688.5; },
       "field 'intermediate_size' must be an integer"},
      {"bool as eps", [](nlohmann::json& j) { j["rms_norm_eps"] = true; },
       "field 'rms_norm_eps' must be a number"},
      {"tie as string", [](nlohmann::json& j) { j["tie_word_embeddings"] = "yes"; },
       "field 'tie_word_embeddings' must be a boolean"},
      {"eos as string", [](nlohmann::json& j) { j["eos_token_id"] = "</s>"; },
       "field 'eos_token_id' must be an integer or a list of integers"},
      {"unknown arch", [](nlohmann::json& j) { j["architectures"] = {"GPT2LMHeadModel"}; },
       "/models/x/config.json: field 'architectures'"},
      {"gelu", [](nlohmann::json& j) { j["hidden_act"] = "gelu"; },
       "/models/x/config.json: field 'hidden_act' is \"gelu\""},
      {"gqa", [](nlohmann::json& j) { j["num_key_value_heads"] = 3; },
       "field 'num_key_value_heads' 3 does not divide num_attention_heads 8"},
      {"zero layers", [](nlohmann::json& j) { j["num_hidden_layers"] = 0; },
       "field 'num_hidden_layers' must be positive"},
      {"negative vocab", [](nlohmann::json& j) { j["vocab_size"] = -5; },
       "field 'vocab_size' must be positive"},
      {"indivisible heads",
       [](nlohmann::json& j) {
         j["num_attention_heads"] = 6;
         j["num_key_value_heads"] = 6;
       },
       "field 'hidden_size' 256 is not divisible by num_attention_heads 6"},
      {"odd head_dim", [](nlohmann::json& j) { j["head_dim"] = 33; },
       "field 'head_dim' must be even"},
      {"float64", [](nlohmann::json& j) { j["torch_dtype"] = "float64"; },
       "field 'torch_dtype' is \"float64\""},
      {"o_proj bias", [](nlohmann::json& j) { j["attention_bias"] = true; },
       "field 'attention_bias' is true"},
      {"mlp bias", [](nlohmann::json& j) { j["mlp_bias"] = true; }, "field 'mlp_bias'"},
      {"huge", [](nlohmann::json& j) { j["hidden_size"] = 1ll << 40; },
       "field 'hidden_size' is out of range"},
  };
  for (const Case& c : cases) {
    nlohmann::json j = BaseLlama();
    c.edit(j);
    auto r = Parse(j);
    ASSERT_FALSE(r.ok()) << c.what;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << c.what;
    EXPECT_THAT(r.status().message(), HasSubstr("/models/x/config.json")) << c.what;
    EXPECT_THAT(r.status().message(), HasSubstr(c.expect)) << c.what;
  }
}

TEST(ModelConfigTest, InvalidJsonAndNonObject) {
  auto bad = ParseModelConfig("{\"hidden_size\": ", "a/config.json");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.status().message(), HasSubstr("a/config.json: invalid JSON"));
  auto arr = ParseModelConfig("[1, 2]", "a/config.json");
  ASSERT_FALSE(arr.ok());
  EXPECT_THAT(arr.status().message(), HasSubstr("a/config.json"));
}

TEST(ModelConfigTest, MergeGenerationConfig) {
  auto c = Parse(BaseLlama());
  ASSERT_TRUE(c.ok());
  c->bos_token_id = -1;
  ASSERT_TRUE(MergeGenerationConfig(
                  R"({"bos_token_id": 7, "eos_token_id": [2, 32000, 2], "max_length": 64})",
                  "gen.json", &*c)
                  .ok());
  EXPECT_EQ(c->bos_token_id, 7);
  EXPECT_THAT(c->eos_token_ids, ElementsAre(2, 32000));
  // bos only filled in when absent; eos int form.
  ASSERT_TRUE(
      MergeGenerationConfig(R"({"bos_token_id": 9, "eos_token_id": 5})", "gen.json", &*c).ok());
  EXPECT_EQ(c->bos_token_id, 7);
  EXPECT_THAT(c->eos_token_ids, ElementsAre(2, 32000, 5));
  absl::Status st = MergeGenerationConfig(R"({"eos_token_id": "x"})", "gen.json", &*c);
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.message(), HasSubstr("gen.json"));
  EXPECT_THAT(st.message(), HasSubstr("'eos_token_id'"));
  EXPECT_THAT(c->eos_token_ids, ElementsAre(2, 32000, 5));  // unchanged on error
}

TEST(ModelConfigTest, LoadModelConfigMissingDirectory) {
  auto c = LoadModelConfig("/nonexistent/model");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(c.status().message(), HasSubstr("/nonexistent/model/config.json"));
}

TEST(ModelConfigTest, DTypeNamesAndSizes) {
  EXPECT_STREQ(DTypeName(DType::kF32), "float32");
  EXPECT_STREQ(DTypeName(DType::kF16), "float16");
  EXPECT_STREQ(DTypeName(DType::kBF16), "bfloat16");
  EXPECT_EQ(DTypeSize(DType::kF32), 4u);
  EXPECT_EQ(DTypeSize(DType::kF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
}

// ---- RoPE --------------------------------------------------------------------------

TEST(RopeTest, DefaultInvFreq) {
  auto c = LoadModelConfig(kStories);
  ASSERT_TRUE(c.ok());
  std::vector<float> f = RopeInvFreq(*c);
  ASSERT_EQ(f.size(), 4u);  // head_dim 8
  EXPECT_FLOAT_EQ(f[0], 1.0f);
  EXPECT_FLOAT_EQ(f[1], 0.1f);  // 10000^(-2/8)
  EXPECT_FLOAT_EQ(f[2], 0.01f);
  EXPECT_FLOAT_EQ(f[3], 0.001f);
}

TEST(RopeTest, LinearScalingDividesByFactor) {
  auto c = Parse(BaseLlama());
  ASSERT_TRUE(c.ok());
  std::vector<float> base = RopeInvFreq(*c);
  c->rope_scaling.type = RopeScaling::Type::kLinear;
  c->rope_scaling.factor = 4.0f;
  std::vector<float> lin = RopeInvFreq(*c);
  ASSERT_EQ(lin.size(), base.size());
  for (size_t i = 0; i < base.size(); ++i) EXPECT_FLOAT_EQ(lin[i], base[i] / 4.0f);
}

// transformers' `_compute_llama3_parameters`, written out per element.
double HfLlama3(double inv_freq, double factor, double low_freq_factor, double high_freq_factor,
                double old_context_len) {
  const double low_freq_wavelen = old_context_len / low_freq_factor;
  const double high_freq_wavelen = old_context_len / high_freq_factor;
  const double wavelen = 2 * M_PI / inv_freq;
  double inv_freq_llama = wavelen > low_freq_wavelen ? inv_freq / factor : inv_freq;
  const double smooth_factor =
      (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
  const double smoothed =
      (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama;
  const bool is_medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
  return is_medium ? smoothed : inv_freq_llama;
}

TEST(RopeTest, Llama3ScalingMatchesTransformers) {
  // Llama 3.1 8B.
  nlohmann::json j = BaseLlama();
  j["hidden_size"] = 4096;
  j["num_attention_heads"] = 32;
  j["num_key_value_heads"] = 8;
  j["rope_theta"] = 500000.0;
  j["rope_scaling"] = {{"rope_type", "llama3"},
                       {"factor", 8.0},
                       {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192}};
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  std::vector<float> f = RopeInvFreq(*c);
  ASSERT_EQ(f.size(), 64u);
  int low = 0, medium = 0, high = 0;
  for (int i = 0; i < 64; ++i) {
    const double inv = std::pow(500000.0, -(2.0 * i) / 128.0);
    const double expect = HfLlama3(inv, 8.0, 1.0, 4.0, 8192.0);
    EXPECT_NEAR(f[i], expect, 1e-6 * expect) << i;
    const double wavelen = 2 * M_PI / inv;
    if (wavelen < 2048) {
      ++high;
      EXPECT_NEAR(f[i], inv, 1e-6 * inv) << i;  // unchanged
    } else if (wavelen > 8192) {
      ++low;
      EXPECT_NEAR(f[i], inv / 8, 1e-6 * inv) << i;  // divided by factor
    } else {
      ++medium;
      EXPECT_LT(f[i], inv);
      EXPECT_GT(f[i], inv / 8);
    }
  }
  // All three regimes occur for these parameters.
  EXPECT_GT(low, 0);
  EXPECT_GT(medium, 0);
  EXPECT_GT(high, 0);
}

// ---- ModelConfigToJson ---------------------------------------------------------------

void ExpectSameConfig(const ModelConfig& a, const ModelConfig& b) {
  EXPECT_EQ(a.architecture, b.architecture);
  EXPECT_EQ(a.model_type, b.model_type);
  EXPECT_EQ(a.hidden_size, b.hidden_size);
  EXPECT_EQ(a.intermediate_size, b.intermediate_size);
  EXPECT_EQ(a.num_layers, b.num_layers);
  EXPECT_EQ(a.num_heads, b.num_heads);
  EXPECT_EQ(a.num_kv_heads, b.num_kv_heads);
  EXPECT_EQ(a.head_dim, b.head_dim);
  EXPECT_EQ(a.vocab_size, b.vocab_size);
  EXPECT_EQ(a.max_position_embeddings, b.max_position_embeddings);
  EXPECT_EQ(a.rms_norm_eps, b.rms_norm_eps);
  EXPECT_EQ(a.rope_theta, b.rope_theta);
  EXPECT_EQ(a.rope_scaling.type, b.rope_scaling.type);
  EXPECT_EQ(a.rope_scaling.factor, b.rope_scaling.factor);
  EXPECT_EQ(a.rope_scaling.low_freq_factor, b.rope_scaling.low_freq_factor);
  EXPECT_EQ(a.rope_scaling.high_freq_factor, b.rope_scaling.high_freq_factor);
  EXPECT_EQ(a.rope_scaling.original_max_position_embeddings,
            b.rope_scaling.original_max_position_embeddings);
  EXPECT_EQ(a.attention_bias, b.attention_bias);
  EXPECT_EQ(a.qk_norm, b.qk_norm);
  EXPECT_EQ(a.tie_word_embeddings, b.tie_word_embeddings);
  EXPECT_EQ(a.dtype, b.dtype);
  EXPECT_EQ(a.bos_token_id, b.bos_token_id);
  EXPECT_EQ(a.eos_token_ids, b.eos_token_ids);
  EXPECT_EQ(a.pad_token_id, b.pad_token_id);
}

TEST(ModelConfigTest, ToJsonRoundTrips) {
  std::vector<ModelConfig> configs;
  configs.push_back(*LoadModelConfig(kStories));
  {
    nlohmann::json j = BaseLlama();
    j["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", 8.0},
                         {"low_freq_factor", 1.0},
                         {"high_freq_factor", 4.0},
                         {"original_max_position_embeddings", 8192}};
    j["rms_norm_eps"] = 1e-5;
    j["rope_theta"] = 500000.0;
    j["eos_token_id"] = {128001, 128008, 128009};
    j["pad_token_id"] = 0;
    configs.push_back(*Parse(j));
    j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.5}};
    j["torch_dtype"] = "float16";
    configs.push_back(*Parse(j));
    j["architectures"] = {"Qwen2ForCausalLM"};
    j["model_type"] = "qwen2";
    configs.push_back(*Parse(j));
    j["architectures"] = {"Qwen3ForCausalLM"};
    j["model_type"] = "qwen3";
    j["head_dim"] = 64;
    configs.push_back(*Parse(j));
  }
  for (const ModelConfig& c : configs) {
    const std::string text = ModelConfigToJson(c);
    auto back = ParseModelConfig(text, "roundtrip.json");
    ASSERT_TRUE(back.ok()) << back.status() << "\n" << text;
    ExpectSameConfig(c, *back);
  }
  // Floats are written in their shortest form.
  EXPECT_THAT(ModelConfigToJson(configs[0]), HasSubstr("\"rms_norm_eps\": 1e-05"));
}

}  // namespace
}  // namespace superpose::engine
