// The real stories260k model on the CPU backend reproduces golden.json: first-step
// top-5 logits within 1e-4 relative, and 64 greedy tokens token for token.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>

#include "engine/cpu/cpu_backend.h"
#include "engine/runtime/engine.h"
#include "engine/runtime/model_bundle.h"
#include "tests/test_util.h"

namespace superpose {
namespace {

using testing::ReadJson;
using testing::Stories260kDir;

class GoldenTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto bundle = engine::LoadModelBundle(Stories260kDir());
    ASSERT_TRUE(bundle.ok()) << bundle.status();
    model_ = std::move(*bundle);
    golden_ = ReadJson(Stories260kDir() + "/golden.json");
    // The golden loops below pass vacuously on an empty list: a fixture without cases
    // is a failure.
    ASSERT_TRUE(golden_["generation"].is_array());
    ASSERT_FALSE(golden_["generation"].empty());
  }
  engine::ModelBundle model_;
  nlohmann::json golden_;
};

TEST_F(GoldenTest, FirstStepTop5LogitsMatch) {
  engine::BackendOptions opts;
  opts.kv_num_blocks = 64;
  engine::cpu::CpuBackend backend(opts);
  ASSERT_TRUE(backend.Load(model_.config, *model_.weights, engine::Shard{}).ok());
  for (const auto& c : golden_["generation"]) {
    const std::vector<int32_t> prompt = c["prompt_ids"].get<std::vector<int32_t>>();
    engine::BatchPlan plan;
    engine::SeqPlan seq;
    seq.num_tokens = static_cast<int32_t>(prompt.size());
    for (size_t i = 0; i < prompt.size(); ++i) {
      plan.tokens.push_back(prompt[i]);
      plan.positions.push_back(static_cast<float>(i));
      plan.kv_slots.push_back({static_cast<int32_t>(i / 16), static_cast<int32_t>(i % 16)});
    }
    plan.seqs.push_back(seq);
    plan.logits_for.push_back(seq.num_tokens - 1);
    engine::ForwardOutput out;
    ASSERT_TRUE(backend.Forward(plan, &out).ok());
    ASSERT_EQ(out.logits.size(), static_cast<size_t>(model_.config.vocab_size));
    std::vector<int32_t> order(out.logits.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t a, int32_t b) { return out.logits[a] > out.logits[b]; });
    const auto& top5 = c["first_step_top5"];
    for (size_t k = 0; k < top5.size(); ++k) {
      const int32_t id = top5[k]["id"];
      const double want = top5[k]["logit"];
      EXPECT_EQ(order[k], id) << c["name"] << " rank " << k;
      EXPECT_NEAR(out.logits[id], want, 1e-4 * std::abs(want)) << c["name"] << " id " << id;
    }
  }
}

TEST_F(GoldenTest, GreedyGenerationMatchesTokenForToken) {
  engine::BackendOptions opts;
  opts.kv_num_blocks = 64;
  engine::cpu::CpuBackend backend(opts);
  ASSERT_TRUE(backend.Load(model_.config, *model_.weights, engine::Shard{}).ok());
  engine::Engine eng(engine::EngineOptions{}, model_.config, model_.tokenizer.get(), &backend);
  eng.Start();
  for (const auto& c : golden_["generation"]) {
    auto prompt = c["prompt_ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(model_.tokenizer->Encode(c["prompt"].get<std::string>(), true), prompt);
    auto result = testing::RunRequest(
        eng, testing::GreedyRequest(prompt, c["max_new_tokens"].get<int32_t>()));
    ASSERT_TRUE(result.status.ok()) << result.status;
    EXPECT_EQ(result.tokens, c["completion_ids"].get<std::vector<int32_t>>()) << c["name"];
    EXPECT_EQ(result.text, c["completion_text"].get<std::string>()) << c["name"];
    EXPECT_EQ(result.finish, engine::FinishReason::kLength);
    EXPECT_EQ(result.usage.prompt_tokens, static_cast<int32_t>(prompt.size()));
    EXPECT_EQ(result.usage.generated_tokens, 64);
  }
  eng.Shutdown(absl::Seconds(1));
  EXPECT_EQ(eng.blocks().free_blocks(), eng.blocks().num_blocks());
}

}  // namespace
}  // namespace superpose
