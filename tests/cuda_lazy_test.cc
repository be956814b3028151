// LazyLLM on the CUDA backend: not implemented yet, so SupportsLazy() is false and a
// lazy plan is refused with UNIMPLEMENTED before any device work (the backend stays
// usable). Skips without a GPU.
#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "engine/backend.h"
#include "engine/runtime/model_bundle.h"

#if SUPERPOSE_HAVE_CUDA
#include "cuda/cuda_backend.h"
#include "cuda/cuda_errors.h"
#endif

namespace superpose {
namespace {

TEST(CudaLazyTest, RefusesLazyPlansAndKeepsServing) {
#if SUPERPOSE_HAVE_CUDA
  std::string why;
  if (!cuda::CudaAvailable(&why)) GTEST_SKIP() << "no usable CUDA device: " << why;
  auto model = engine::LoadModelBundle("");
  ASSERT_TRUE(model.ok());
  engine::BackendOptions opts;
  opts.kv_num_blocks = 8;
  auto gpu = cuda::MakeCudaBackend(opts);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  ASSERT_TRUE((*gpu)->Load(model->config, *model->weights, engine::Shard{}).ok());
  EXPECT_FALSE((*gpu)->SupportsLazy());
  engine::BatchPlan plan;
  engine::SeqPlan s;
  s.num_tokens = 3;
  plan.tokens = {256, 72, 101};
  plan.positions = {0, 1, 2};
  plan.kv_slots = {{0, 0}, {0, 1}, {0, 2}};
  plan.logits_for = {2};
  plan.seqs.push_back(s);
  engine::ForwardOutput plain;
  ASSERT_TRUE((*gpu)->Forward(plan, &plain).ok());
  plan.seqs[0].lazy.boundaries = {1};
  plan.seqs[0].lazy.stage_context.resize(1);
  plan.seqs[0].lazy.stage_slots = {plan.kv_slots};
  plan.seqs[0].lazy.keep = {0.5f};
  engine::ForwardOutput out;
  EXPECT_EQ((*gpu)->Forward(plan, &out).code(), absl::StatusCode::kUnimplemented);
  plan.seqs[0].lazy = {};
  engine::ForwardOutput again;
  ASSERT_TRUE((*gpu)->Forward(plan, &again).ok());
  EXPECT_EQ(again.logits, plain.logits);
  EXPECT_TRUE((*gpu)->Health().ok());
#else
  GTEST_SKIP() << "built without CUDA (SUPERPOSE_HAVE_CUDA is off)";
#endif
}

}  // namespace
}  // namespace superpose
