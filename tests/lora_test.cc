// LoRA adapters on the CPU backend (engine/lora_adapter.h, engine/cpu/lora.h): the PEFT
// reader and its checks; B = 0 gives the base model's logits exactly; a random adapter
// gives the logits of the merged dense weights W + s B A within 1e-4 on stories260k;
// sequences with different adapters in one batch get the logits they get alone, bitwise;
// tp = 2 and 4 give the logits of tp = 1.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "engine/lora_adapter.h"
#include "engine/model/weights.h"
#include "engine/runtime/model_bundle.h"
#include "tests/forwarding_backend.h"
#include "tests/lora_reference.h"
#include "tests/test_util.h"

namespace superpose {
namespace {

using engine::LoraAdapter;

const std::vector<int32_t> kAllModules = {engine::kLoraQ,   engine::kLoraK,    engine::kLoraV,
                                          engine::kLoraO,   engine::kLoraGate, engine::kLoraUp,
                                          engine::kLoraDown};

std::string TempDir(const std::string& name) {
  const std::string dir = (std::filesystem::temp_directory_path() /
                           ("lora_test_" + std::to_string(getpid()) + "_" + name))
                              .string();
  std::filesystem::remove_all(dir);
  return dir;
}

// Sets every sequence's adapter to `id` (0: none).
class WithAdapter : public testing::ForwardingBackend {
 public:
  WithAdapter(engine::Backend* inner, int64_t id) : ForwardingBackend(inner), id_(id) {}
  absl::Status Forward(const engine::BatchPlan& plan, engine::ForwardOutput* out) override {
    engine::BatchPlan p = plan;
    for (auto& s : p.seqs) s.adapter = id_;
    return inner()->Forward(p, out);
  }

 private:
  int64_t id_;
};

class LoraTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = engine::LoadModelBundle(testing::Stories260kDir());
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::make_unique<engine::ModelBundle>(*std::move(m));
  }
  std::unique_ptr<engine::Backend> Backend(int tp = 1) const {
    engine::BackendOptions opts;
    opts.kv_num_blocks = 64;
    opts.tensor_parallel = tp;
    engine::cpu::CpuOptions cpu;
    cpu.dtype = engine::cpu::WeightDType::kFloat32;
    auto b = engine::cpu::MakeCpuBackend(opts, cpu);
    EXPECT_TRUE(b->Load(model_->config, *model_->weights, engine::Shard{}).ok());
    return b;
  }
  // The adapter written to disk and read back (the path the server takes).
  LoraAdapter RoundTrip(const LoraAdapter& a, const std::string& name) const {
    const std::string dir = TempDir(name);
    EXPECT_TRUE(engine::WritePeftAdapter(dir, a, engine::DType::kF32).ok());
    auto back = engine::LoadPeftAdapter(dir, model_->config);
    EXPECT_TRUE(back.ok()) << back.status();
    std::filesystem::remove_all(dir);
    return back.ok() ? *back : LoraAdapter{};
  }
  std::unique_ptr<engine::ModelBundle> model_;
  const std::vector<int32_t> prompt_ = {1, 403, 407, 261, 378, 290, 300, 411};
};

TEST_F(LoraTest, PeftRoundTripInEveryDtype) {
  LoraAdapter a = engine::RandomLoraAdapter(model_->config, 8, 16.0f, kAllModules, 1, 0.5f);
  a.base_model = "stories260k";
  for (engine::DType dt : {engine::DType::kF32, engine::DType::kBF16, engine::DType::kF16}) {
    const std::string dir = TempDir("dtype");
    ASSERT_TRUE(engine::WritePeftAdapter(dir, a, dt).ok());
    auto b = engine::LoadPeftAdapter(dir, model_->config);
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_EQ(b->rank, 8);
    EXPECT_FLOAT_EQ(b->scale, 2.0f);
    EXPECT_EQ(b->base_model, "stories260k");
    EXPECT_EQ(b->modules().size(), 7u);
    const float tol = dt == engine::DType::kF32 ? 0.0f : 4e-3f;
    for (size_t l = 0; l < a.layers.size(); ++l) {
      for (int m = 0; m < engine::kNumLoraModules; ++m) {
        ASSERT_EQ(b->layers[l][m].a.size(), a.layers[l][m].a.size());
        for (size_t i = 0; i < a.layers[l][m].a.size(); ++i) {
          ASSERT_NEAR(b->layers[l][m].a[i], a.layers[l][m].a[i], tol);
        }
      }
    }
    std::filesystem::remove_all(dir);
  }
}

// Writes adapter_config.json with `config` and the tensors of `a` (possibly renamed).
std::string WriteRaw(const std::string& name, const std::string& config,
                     const std::vector<engine::NamedTensor>& tensors) {
  const std::string dir = TempDir(name);
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/adapter_config.json") << config;
  EXPECT_TRUE(
      engine::WriteSafetensors(dir + "/adapter_model.safetensors", tensors, engine::DType::kF32)
          .ok());
  return dir;
}

TEST_F(LoraTest, BadAdaptersAreRefusedWithClearErrors) {
  const engine::ModelConfig& c = model_->config;
  std::vector<float> a(4 * 64, 0.1f), b(512 * 4, 0.1f), wrong(4 * 63, 0.1f);
  const std::string q = "base_model.model.model.layers.0.self_attn.q_proj.";
  const std::string base_cfg = R"({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})";
  struct Case {
    std::string name, config;
    std::vector<engine::NamedTensor> tensors;
    std::string want;
  };
  std::vector<Case> cases = {
      {"rank",
       R"({"r": 65, "lora_alpha": 8, "target_modules": ["q_proj"]})",
       {},
       "r must be in [1, 64]"},
      {"module", R"({"r": 4, "target_modules": ["qkv_proj"]})", {}, "unknown module 'qkv_proj'"},
      {"noconfig", "not json", {}, "not a JSON object"},
      {"shape",
       base_cfg,
       {{q + "lora_A.weight", {4, 63}, wrong.data()}, {q + "lora_B.weight", {64, 4}, b.data()}},
       "expected shape"},
      {"name",
       base_cfg,
       {{"base_model.model.model.layers.0.self_attn.q_proj.weight", {4, 64}, a.data()}},
       "not a LoRA tensor"},
      {"untargeted",
       base_cfg,
       {{"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight", {4, 64}, a.data()}},
       "not in target_modules"},
      {"layer",
       base_cfg,
       {{"base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight", {4, 64}, a.data()}},
       "layer 9 past"},
      {"missing", base_cfg, {{q + "lora_A.weight", {4, 64}, a.data()}}, "missing"},
  };
  for (const Case& k : cases) {
    const std::string dir =
        WriteRaw(k.name, k.config,
                 k.tensors.empty()
                     ? std::vector<engine::NamedTensor>{{q + "lora_A.weight", {4, 64}, a.data()}}
                     : k.tensors);
    auto r = engine::LoadPeftAdapter(dir, c);
    ASSERT_FALSE(r.ok()) << k.name;
    EXPECT_NE(r.status().message().find(k.want), std::string::npos) << k.name << ": " << r.status();
    std::filesystem::remove_all(dir);
  }
  auto none = engine::LoadPeftAdapter("/nonexistent/adapter", c);
  EXPECT_EQ(none.status().code(), absl::StatusCode::kNotFound);
}

TEST_F(LoraTest, ZeroBGivesTheBaseLogitsExactly) {
  auto base = Backend();
  const auto want = testing::RunSteps(*base, prompt_, 6);
  auto b = Backend();
  LoraAdapter zero = RoundTrip(
      engine::RandomLoraAdapter(model_->config, 16, 32.0f, kAllModules, 7, 0.5f, true), "zero");
  ASSERT_TRUE(b->LoadAdapter(1, zero).ok());
  WithAdapter w(b.get(), 1);
  const auto got = testing::RunSteps(w, prompt_, 6);
  ASSERT_EQ(got.size(), want.size());
  for (size_t s = 0; s < want.size(); ++s) EXPECT_EQ(got[s], want[s]) << "step " << s;
}

void ExpectClose(const std::vector<std::vector<float>>& got,
                 const std::vector<std::vector<float>>& want, float tol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t s = 0; s < want.size(); ++s) {
    ASSERT_EQ(got[s].size(), want[s].size()) << what;
    for (size_t i = 0; i < want[s].size(); ++i) {
      ASSERT_NEAR(got[s][i], want[s][i], tol) << what << " step " << s << " id " << i;
    }
  }
}

TEST_F(LoraTest, RandomAdapterEqualsTheMergedDenseModel) {
  const LoraAdapter a = RoundTrip(
      engine::RandomLoraAdapter(model_->config, 16, 16.0f, kAllModules, 11, 0.08f), "dense");
  auto adapted = Backend();
  ASSERT_TRUE(adapted->LoadAdapter(5, a).ok());
  WithAdapter w(adapted.get(), 5);
  auto merged_weights = testing::MergedLoraWeights(*model_, a);
  engine::BackendOptions opts;
  opts.kv_num_blocks = 64;
  engine::cpu::CpuOptions cpu;
  cpu.dtype = engine::cpu::WeightDType::kFloat32;
  auto dense = engine::cpu::MakeCpuBackend(opts, cpu);
  ASSERT_TRUE(dense->Load(model_->config, *merged_weights, engine::Shard{}).ok());
  const auto want = testing::RunSteps(*dense, prompt_, 8);
  std::vector<int32_t> forced;
  for (const auto& row : want) {
    forced.push_back(static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin()));
  }
  const auto got = testing::RunSteps(w, prompt_, 8, &forced);
  ExpectClose(got, want, 1e-4f, "lora vs dense");
  // The adapter does change the model (the test would pass trivially otherwise).
  auto base = Backend();
  const auto plain = testing::RunSteps(*base, prompt_, 8, &forced);
  float diff = 0;
  for (size_t i = 0; i < plain[0].size(); ++i)
    diff = std::max(diff, std::abs(plain[0][i] - got[0][i]));
  EXPECT_GT(diff, 1e-2f);
}

// One prefill step of several sequences (own blocks: sequence i uses blocks 8i..),
// each with its adapter; returns each sequence's last logits row.
std::vector<std::vector<float>> Batch(engine::Backend& b,
                                      const std::vector<std::vector<int32_t>>& prompts,
                                      const std::vector<int64_t>& adapters,
                                      const std::vector<int32_t>& slots) {
  engine::BatchPlan plan;
  for (size_t s = 0; s < prompts.size(); ++s) {
    engine::SeqPlan p;
    p.id = static_cast<engine::SeqId>(s + 1);
    p.token_begin = plan.num_tokens();
    p.num_tokens = static_cast<int32_t>(prompts[s].size());
    p.adapter = adapters[s];
    for (size_t i = 0; i < prompts[s].size(); ++i) {
      plan.tokens.push_back(prompts[s][i]);
      plan.positions.push_back(static_cast<float>(i));
      plan.kv_slots.push_back(
          {static_cast<int32_t>(slots[s] * 8 + i / 16), static_cast<int32_t>(i % 16)});
    }
    plan.logits_for.push_back(plan.num_tokens() - 1);
    plan.seqs.push_back(p);
  }
  engine::ForwardOutput out;
  EXPECT_TRUE(b.Forward(plan, &out).ok());
  const int32_t V = 512;
  std::vector<std::vector<float>> rows;
  for (size_t s = 0; s < prompts.size(); ++s) {
    rows.emplace_back(out.logits.begin() + s * V, out.logits.begin() + (s + 1) * V);
  }
  return rows;
}

TEST_F(LoraTest, MixedAdapterBatchEqualsEachSequenceAloneBitwise) {
  auto b = Backend();
  ASSERT_TRUE(
      b->LoadAdapter(1, engine::RandomLoraAdapter(model_->config, 8, 8.0f, kAllModules, 21, 0.1f))
          .ok());
  ASSERT_TRUE(b->LoadAdapter(2, engine::RandomLoraAdapter(
                                    model_->config, 32, 16.0f,
                                    {engine::kLoraK, engine::kLoraV, engine::kLoraDown}, 22, 0.1f))
                  .ok());
  const std::vector<std::vector<int32_t>> prompts = {{1, 403, 407, 261, 378},
                                                     {1, 300, 301, 302, 303, 304, 305},
                                                     {1, 403, 407, 261, 378},
                                                     {1, 17, 18}};
  const std::vector<int64_t> adapters = {1, 0, 2, 1};
  const auto mixed = Batch(*b, prompts, adapters, {0, 1, 2, 3});
  for (size_t s = 0; s < prompts.size(); ++s) {
    const auto alone = Batch(*b, {prompts[s]}, {adapters[s]}, {static_cast<int32_t>(4 + s)});
    EXPECT_EQ(mixed[s], alone[0]) << "sequence " << s;
  }
  EXPECT_NE(mixed[0], mixed[2]);  // same prompt, different adapters
}

TEST_F(LoraTest, UnknownAdapterInAPlanIsRefused) {
  auto b = Backend();
  auto r = Batch(*b, {{1, 2, 3}}, {0}, {0});  // fine without
  engine::BatchPlan plan;
  plan.tokens = {1};
  plan.positions = {0};
  plan.kv_slots = {{0, 0}};
  plan.seqs = {engine::SeqPlan{}};
  plan.seqs[0].num_tokens = 1;
  plan.seqs[0].adapter = 9;
  engine::ForwardOutput out;
  EXPECT_EQ(b->Forward(plan, &out).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(b->UnloadAdapter(9).code() == absl::StatusCode::kNotFound);
}

TEST_F(LoraTest, TensorParallelMatchesOneRank) {
  const LoraAdapter a =
      RoundTrip(engine::RandomLoraAdapter(model_->config, 16, 16.0f, kAllModules, 31, 0.08f), "tp");
  auto one = Backend(1);
  ASSERT_TRUE(one->LoadAdapter(3, a).ok());
  WithAdapter w1(one.get(), 3);
  const auto want = testing::RunSteps(w1, prompt_, 8);
  std::vector<int32_t> forced;
  for (const auto& row : want) {
    forced.push_back(static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin()));
  }
  for (int tp : {2, 4}) {
    auto b = Backend(tp);
    ASSERT_TRUE(b->SupportsAdapters());
    ASSERT_TRUE(b->LoadAdapter(3, a).ok());
    WithAdapter w(b.get(), 3);
    float mx = 0;
    for (float v : want[0]) mx = std::max(mx, std::abs(v));
    ExpectClose(testing::RunSteps(w, prompt_, 8, &forced), want, 1e-5f * std::max(1.0f, mx),
                "tp=" + std::to_string(tp));
    ASSERT_TRUE(b->UnloadAdapter(3).ok());
  }
}

}  // namespace
}  // namespace superpose
