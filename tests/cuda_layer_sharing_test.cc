// Cross-layer weight sharing on the CUDA backend (config.json "layer_weight_map"): a
// layer that maps to another holds no weights of its own on the device and computes with
// its owner's, so stories260k with layers 1 and 3 sharing layers 0 and 2 gives bitwise the
// logits of the same model with those weights copied into layers 1 and 3, in less device
// memory. Skips without a GPU.
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "engine/runtime/model_bundle.h"
#include "tests/shared_layers.h"
#include "tests/test_util.h"

#if SUPERPOSE_HAVE_CUDA
#include "cuda/cuda_backend.h"
#include "cuda/cuda_errors.h"
#endif

namespace superpose {
namespace {

TEST(CudaLayerSharingTest, SharedLayersEqualCopiedWeights) {
#if SUPERPOSE_HAVE_CUDA
  std::string why;
  if (!cuda::CudaAvailable(&why)) GTEST_SKIP() << "no usable CUDA device: " << why;
  auto model = engine::LoadModelBundle(testing::Stories260kDir());
  ASSERT_TRUE(model.ok()) << model.status();
  const std::vector<int32_t> map = {0, 0, 2, 2, 4};
  engine::InMemoryWeights shared, copied;
  testing::SplitSharedLayers(*model, map, &shared, &copied);
  engine::ModelConfig with_map = model->config;
  with_map.layer_weight_map = map;
  auto load = [&](const engine::ModelConfig& c, const engine::WeightSource& w) {
    engine::BackendOptions o;
    o.kv_num_blocks = 16;
    auto b = cuda::MakeCudaBackend(o);
    EXPECT_TRUE(b.ok()) << b.status();
    if (!b.ok()) return std::unique_ptr<engine::Backend>();
    const absl::Status st = (*b)->Load(c, w, engine::Shard{});
    EXPECT_TRUE(st.ok()) << st;
    return st.ok() ? std::move(*b) : nullptr;
  };
  auto a = load(with_map, shared);
  auto b = load(model->config, copied);
  ASSERT_TRUE(a && b);
  const std::vector<int32_t> prompt = model->tokenizer->Encode("Once upon a time", true);
  const auto ra = testing::RunSteps(*a, prompt, 6), rb = testing::RunSteps(*b, prompt, 6);
  ASSERT_EQ(ra.size(), rb.size());
  for (size_t i = 0; i < ra.size(); ++i) EXPECT_EQ(ra[i], rb[i]) << "step " << i;
#else
  GTEST_SKIP() << "built without CUDA";
#endif
}

}  // namespace
}  // namespace superpose
