// Cross-layer weight sharing (config.json "layer_weight_map", SPIN-style isotropic
// stacks; issue 17): the config's checks, and stories260k with layers 1 and 3 sharing
// the weights of layers 0 and 2 computing exactly what the same model with those
// weights copied into layers 1 and 3 computes, without reading layers 1 and 3.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/model/config.h"
#include "engine/runtime/model_bundle.h"
#include "tests/shared_layers.h"
#include "tests/test_util.h"

namespace superpose {
namespace {

std::string ConfigWithMap(const std::string& map_json) {
  return absl::StrCat(R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
    "intermediate_size": 172, "num_hidden_layers": 5, "num_attention_heads": 8,
    "num_key_value_heads": 4, "vocab_size": 512, "max_position_embeddings": 512,
    "layer_weight_map": )",
                      map_json, "}");
}

TEST(LayerSharingConfigTest, ParsesAndChecksTheMap) {
  auto c = engine::ParseModelConfig(ConfigWithMap("[0, 0, 2, 2, 4]"), "config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->WeightLayer(1), 0);
  EXPECT_EQ(c->WeightLayer(4), 4);
  EXPECT_EQ(c->DistinctLayers(), 3);
  auto plain = engine::ParseModelConfig(ConfigWithMap("null"), "config.json");
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(plain->DistinctLayers(), 5);
  EXPECT_LT(c->NumParameters(), plain->NumParameters());
  // Every layer still streams its (shared) weights once per use.
  EXPECT_EQ(c->WeightBytes(engine::DType::kF32), plain->WeightBytes(engine::DType::kF32));
  // Written back by the generator's serializer.
  auto again = engine::ParseModelConfig(engine::ModelConfigToJson(*c), "again");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->layer_weight_map, c->layer_weight_map);
  for (const char* bad : {"[0, 0, 2, 2]", "[0, 0, 2, 2, 5]", "[0, 0, 1, 2, 4]", "[0, -1, 2, 2, 4]",
                          "\"0,0,2,2,4\"", "[0, 0.5, 2, 2, 4]"}) {
    auto st = engine::ParseModelConfig(ConfigWithMap(bad), "config.json");
    EXPECT_EQ(st.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(st.status().message().find("layer_weight_map"), std::string::npos) << bad;
  }
}

std::unique_ptr<engine::Backend> LoadCpu(const engine::ModelConfig& config,
                                         const engine::WeightSource& weights) {
  engine::BackendOptions o;
  o.kv_num_blocks = 16;
  auto b = engine::cpu::MakeCpuBackend(o);
  const absl::Status st = b->Load(config, weights, engine::Shard{});
  EXPECT_TRUE(st.ok()) << st;
  return st.ok() ? std::move(b) : nullptr;
}

TEST(LayerSharingTest, SharedLayersEqualCopiedWeightsAndAreNotRead) {
  auto model = engine::LoadModelBundle(testing::Stories260kDir());
  ASSERT_TRUE(model.ok()) << model.status();
  const std::vector<int32_t> map = {0, 0, 2, 2, 4};
  // Shared: layers 1 and 3 are absent from the checkpoint. Copied: they hold layer 0's
  // and layer 2's tensors.
  engine::InMemoryWeights shared, copied;
  testing::SplitSharedLayers(*model, map, &shared, &copied);
  engine::ModelConfig with_map = model->config;
  with_map.layer_weight_map = map;
  auto a = LoadCpu(with_map, shared);
  auto b = LoadCpu(model->config, copied);
  ASSERT_TRUE(a && b);
  const std::vector<int32_t> prompt = model->tokenizer->Encode("Once upon a time", true);
  const auto ra = testing::RunSteps(*a, prompt, 6), rb = testing::RunSteps(*b, prompt, 6);
  ASSERT_EQ(ra.size(), rb.size());
  for (size_t i = 0; i < ra.size(); ++i) EXPECT_EQ(ra[i], rb[i]) << "step " << i;
  // Without the map, the sparse checkpoint is missing layer 1.
  engine::BackendOptions o;
  o.kv_num_blocks = 16;
  auto c = engine::cpu::MakeCpuBackend(o);
  EXPECT_FALSE(c->Load(model->config, shared, engine::Shard{}).ok());
}

}  // namespace
}  // namespace superpose
