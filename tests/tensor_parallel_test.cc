// Tensor parallelism on the CPU (thread communicator): tp = 2 and 4 give the logits of
// tp = 1 within 1e-5 relative (to the row's largest |logit|) and the same greedy tokens.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "engine/cpu/cpu_backend.h"
#include "engine/cpu/thread_communicator.h"
#include "engine/runtime/engine.h"
#include "engine/runtime/model_bundle.h"
#include "tests/test_util.h"

namespace superpose {
namespace {

void CompareTp(const engine::ModelBundle& model, const std::vector<int32_t>& prompt) {
  engine::BackendOptions opts;
  opts.kv_num_blocks = 32;
  auto ref = engine::cpu::MakeCpuBackend(opts, 1);
  ASSERT_TRUE(ref->Load(model.config, *model.weights, engine::Shard{}).ok());
  const auto want = testing::RunSteps(*ref, prompt, 12);
  for (int tp : {2, 4}) {
    auto b = engine::cpu::MakeCpuBackend(opts, tp);
    absl::Status st = b->Load(model.config, *model.weights, engine::Shard{});
    ASSERT_TRUE(st.ok()) << "tp=" << tp << ": " << st;
    const auto got = testing::RunSteps(*b, prompt, 12);
    ASSERT_EQ(got.size(), want.size());
    for (size_t s = 0; s < want.size(); ++s) {
      ASSERT_EQ(got[s].size(), want[s].size());
      float mx = 0;
      for (float v : want[s]) mx = std::max(mx, std::abs(v));
      for (size_t i = 0; i < want[s].size(); ++i) {
        ASSERT_NEAR(got[s][i], want[s][i], 1e-5f * mx)
            << "tp=" << tp << " step " << s << " id " << i;
      }
    }
  }
}

TEST(TensorParallelTest, Stories260kMatchesSingleRank) {
  auto model = engine::LoadModelBundle(testing::Stories260kDir());
  ASSERT_TRUE(model.ok()) << model.status();
  CompareTp(*model, {1, 403, 407, 261, 378});
}

TEST(TensorParallelTest, BuiltinWithReplicatedKvHeadsMatchesSingleRank) {
  // 4 query heads, 2 kv heads: tp = 4 replicates each kv head on two ranks.
  auto model = engine::LoadModelBundle("");
  ASSERT_TRUE(model.ok()) << model.status();
  CompareTp(*model, {256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100});
}

TEST(TensorParallelTest, GoldenGreedyThroughTheEngineAtTp2And4) {
  auto model = engine::LoadModelBundle(testing::Stories260kDir());
  ASSERT_TRUE(model.ok());
  auto golden = testing::ReadJson(testing::Stories260kDir() + "/golden.json");
  for (int tp : {2, 4}) {
    engine::BackendOptions opts;
    opts.kv_num_blocks = 64;
    auto b = engine::cpu::MakeCpuBackend(opts, tp);
    ASSERT_TRUE(b->Load(model->config, *model->weights, engine::Shard{}).ok());
    engine::Engine eng(engine::EngineOptions{}, model->config, model->tokenizer.get(), b.get());
    eng.Start();
    for (const auto& c : golden["generation"]) {
      auto r = testing::RunRequest(
          eng, testing::GreedyRequest(c["prompt_ids"].get<std::vector<int32_t>>(), 64));
      ASSERT_TRUE(r.status.ok());
      EXPECT_EQ(r.tokens, c["completion_ids"].get<std::vector<int32_t>>()) << "tp=" << tp;
    }
    eng.Shutdown(absl::Seconds(1));
  }
}

TEST(TensorParallelTest, IndivisibleShapesAreRejected) {
  auto model = engine::LoadModelBundle(testing::Stories260kDir());
  ASSERT_TRUE(model.ok());
  auto b = engine::cpu::MakeCpuBackend(engine::BackendOptions{}, 3);  // 8 heads % 3 != 0
  absl::Status st = b->Load(model->config, *model->weights, engine::Shard{});
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(st.message()), ::testing::HasSubstr("num_attention_heads"));
}

}  // namespace
}  // namespace superpose
