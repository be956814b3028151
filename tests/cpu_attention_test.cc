// The CPU backend's attention (engine/cpu/attention.h), at the backend level; the
// kernel's own tests are in attention_kernel_test.cc.
// On every SIMD target: a 150-token prompt run as one chunk after a cached
// prefix, and token by token, give bitwise-equal logits with bf16 weights (every GEMM is
// batch-invariant there) and logits within 1e-4 of the row's largest |logit| with float32
// weights (OpenBLAS sgemm for chunks over 64 rows). On stories260k (head_dim 8) and on a
// random Llama-shaped model with head_dim 64 and GQA.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "engine/cpu/cpu_backend.h"
#include "engine/model/builtin.h"
#include "engine/runtime/model_bundle.h"
#include "tests/simd_targets.h"
#include "tests/test_util.h"

namespace superpose {
namespace {

// bitwise: bf16 weights (batch-invariant GEMMs), so chunk == token by token exactly.
void ExpectChunkMatchesTokenByToken(const engine::ModelBundle* model,
                                    const std::vector<int32_t>& prompt,
                                    const std::string& dtype = "float32") {
  const bool bitwise = dtype == "bfloat16";
  const int32_t V = model->config.vocab_size, bs = 16;
  const int32_t n = static_cast<int32_t>(prompt.size());
  auto make = [&] {
    engine::BackendOptions o;
    o.kv_num_blocks = 32;
    o.kv_block_size = bs;
    auto cpu = engine::cpu::ParseCpuOptions({{"cpu_dtype", dtype}});
    EXPECT_TRUE(cpu.ok()) << cpu.status();
    auto b = std::make_unique<engine::cpu::CpuBackend>(o, *cpu);
    EXPECT_TRUE(b->Load(model->config, *model->weights, engine::Shard{}).ok());
    return b;
  };
  auto slot = [&](int32_t i) { return engine::KvSlot{i / bs, i % bs}; };
  auto context = [&](int32_t len) {
    std::vector<engine::KvSegment> c;
    for (int32_t d = 0; d < len; d += bs) c.push_back({d / bs, 0, std::min(bs, len - d)});
    return c;
  };
  // Chunked: 20 tokens first (a cached prefix), then the rest as one chunk.
  auto chunked = make();
  std::vector<float> got(static_cast<size_t>(n) * V);
  const int32_t split = 20;
  for (auto [begin, end] : {std::pair{0, split}, std::pair{split, n}}) {
    engine::BatchPlan p;
    engine::SeqPlan sp;
    sp.id = 1;
    sp.context = context(begin);
    sp.num_tokens = end - begin;
    for (int32_t i = begin; i < end; ++i) {
      p.tokens.push_back(prompt[i]);
      p.positions.push_back(static_cast<float>(i));
      p.kv_slots.push_back(slot(i));
      p.logits_for.push_back(i - begin);
    }
    p.seqs.push_back(sp);
    engine::ForwardOutput out;
    ASSERT_TRUE(chunked->Forward(p, &out).ok());
    std::copy(out.logits.begin(), out.logits.end(), got.begin() + static_cast<size_t>(begin) * V);
  }
  // Reference: one token per step.
  auto single = make();
  for (int32_t i = 0; i < n; ++i) {
    engine::BatchPlan p;
    engine::SeqPlan sp;
    sp.id = 1;
    sp.context = context(i);
    sp.num_tokens = 1;
    p.tokens = {prompt[i]};
    p.positions = {static_cast<float>(i)};
    p.kv_slots = {slot(i)};
    p.logits_for = {0};
    p.seqs.push_back(sp);
    engine::ForwardOutput out;
    ASSERT_TRUE(single->Forward(p, &out).ok());
    if (bitwise) {
      EXPECT_EQ(0,
                std::memcmp(out.logits.data(), &got[static_cast<size_t>(i) * V], sizeof(float) * V))
          << "token " << i;
      continue;
    }
    double diff = 0, scale = 0;
    for (int32_t v = 0; v < V; ++v) {
      diff = std::max(
          diff, static_cast<double>(std::abs(out.logits[v] - got[static_cast<size_t>(i) * V + v])));
      scale = std::max(scale, static_cast<double>(std::abs(out.logits[v])));
    }
    EXPECT_LT(diff / scale, 1e-4) << "token " << i;
  }
}

TEST(CpuAttention, PrefillChunkMatchesTokenByToken) {
  auto model = engine::LoadModelBundle(testing::Stories260kDir());
  ASSERT_TRUE(model.ok()) << model.status();
  std::vector<int32_t> prompt = model->tokenizer->Encode(
      "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
      "park with her friends. One day, she saw a big red ball under a tree. She ran to get it, "
      "but a dog took it first. Lily was sad, but then the dog brought the ball back and they "
      "played together all day long until the sun went down and it was time to go home.",
      true);
  ASSERT_GT(prompt.size(), 120u);
  testing::ForEachVectorSimdTarget([&](const std::string&) {
    ExpectChunkMatchesTokenByToken(&*model, prompt);
    ExpectChunkMatchesTokenByToken(&*model, prompt, "bfloat16");
  });
}

TEST(CpuAttention, PrefillChunkMatchesTokenByTokenAtHeadDim64) {
  // 4 query heads of 64 over 2 kv heads, 2 layers; float32 weights.
  engine::ModelConfig cfg = engine::LlamaShapedConfig(256, 2, 4, 2, 512, 512);
  ASSERT_EQ(cfg.head_dim, 64);
  const std::string dir = ::testing::TempDir() + "/attention-d64";
  ASSERT_TRUE(engine::WriteRandomModel(dir, cfg, engine::DType::kF32, 7).ok());
  auto model = engine::LoadModelBundle(dir);
  ASSERT_TRUE(model.ok()) << model.status();
  std::vector<int32_t> prompt;
  uint32_t h = 12345;
  for (int i = 0; i < 150; ++i) {
    h = h * 1103515245u + 12345u;
    prompt.push_back(static_cast<int32_t>((h >> 16) % 256));
  }
  testing::ForEachVectorSimdTarget([&](const std::string&) {
    ExpectChunkMatchesTokenByToken(&*model, prompt);
    ExpectChunkMatchesTokenByToken(&*model, prompt, "bfloat16");
  });
}

}  // namespace
}  // namespace superpose
