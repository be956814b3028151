// A seeded sampling request streams the same tokens whichever side draws them: the
// host sampler (engine/runtime/sampler.h) or the backend (the CPU backend's
// cpu_row_sampling: SampleRowReference, the definition the CUDA kernel shares). Both
// run the exponential race of engine/row_sampling.h keyed by seed and draw index; the
// host's vector passes (engine/row_math.h) on every SIMD target.
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "engine/runtime/engine.h"
#include "engine/runtime/model_bundle.h"
#include "tests/simd_targets.h"
#include "tests/test_util.h"

namespace superpose {
namespace {

using testing::Completion;

class SamplingSidesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto bundle = engine::LoadModelBundle(testing::Stories260kDir());
    ASSERT_TRUE(bundle.ok()) << bundle.status();
    model_ = std::move(*bundle);
  }
  // Every request in `reqs`, one after the other, on a fresh engine.
  std::vector<Completion> Run(bool backend_samples, const std::vector<engine::Request>& reqs) {
    engine::BackendOptions opts;
    opts.kv_num_blocks = 64;
    opts.kv_block_size = 16;
    engine::cpu::CpuOptions cpu;
    cpu.row_sampling = backend_samples;
    engine::cpu::CpuBackend backend(opts, cpu);
    EXPECT_TRUE(backend.Load(model_.config, *model_.weights, engine::Shard{}).ok());
    EXPECT_EQ(backend.SamplesRows(), backend_samples);
    engine::Engine eng(engine::EngineOptions{}, model_.config, model_.tokenizer.get(), &backend);
    eng.Start();
    std::vector<Completion> out;
    for (const engine::Request& r : reqs) out.push_back(testing::RunRequest(eng, r));
    eng.Shutdown(absl::ZeroDuration());
    return out;
  }
  engine::Request Sampled(float temperature, float top_p, float min_p, uint64_t seed) {
    engine::Request r =
        testing::GreedyRequest(model_.tokenizer->Encode("Once upon a time", true), 40);
    r.sampling.temperature = temperature;
    r.sampling.top_p = top_p;
    r.sampling.min_p = min_p;
    r.sampling.seed = seed;
    return r;
  }
  engine::ModelBundle model_;
};

TEST_F(SamplingSidesTest, SeededRequestStreamsTheSameTokensOnEitherSide) {
  const std::vector<engine::Request> reqs = {
      Sampled(1.0f, 1.0f, 0.0f, 1), Sampled(0.8f, 0.9f, 0.0f, 2), Sampled(1.3f, 1.0f, 0.05f, 3),
      Sampled(1.0f, 0.95f, 0.02f, 4)};
  // Both sides on each target: the forward pass may round differently per target.
  std::vector<Completion> host;
  superpose::testing::ForEachVectorSimdTarget([&](const std::string&) {
    host = Run(false, reqs);
    const std::vector<Completion> backend = Run(true, reqs);
    ASSERT_EQ(host.size(), reqs.size());
    ASSERT_EQ(backend.size(), reqs.size());
    for (size_t i = 0; i < reqs.size(); ++i) {
      ASSERT_TRUE(host[i].status.ok()) << host[i].status;
      ASSERT_TRUE(backend[i].status.ok()) << backend[i].status;
      EXPECT_EQ(host[i].tokens.size(), 40u) << "request " << i;
      EXPECT_EQ(host[i].tokens, backend[i].tokens) << "request " << i;
    }
  });
  ASSERT_EQ(host.size(), reqs.size());
  // It really sampled: the seeds give different continuations.
  EXPECT_NE(host[0].tokens, host[1].tokens);
}

}  // namespace
}  // namespace superpose
