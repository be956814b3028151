// Quantized stories260k end to end on the CPU backend (engine/model/quant_checkpoint.h,
// engine/cpu/quant_weights.h): superpose-quantize's library converts the fixture to int8
// and q4 directories once per suite, then
//  - the round trip: the written codes equal the converter's own quantization, the
//    float reader of a quantized directory gives exactly its dequantization, and the
//    other tensors are copied byte for byte;
//  - the load-time option (--cpu_dtype=int8|q4 on the float checkpoint) computes bitwise
//    the logits of the converted directory, and float32 on the quantized directory too
//    (QuantGemm is SmallBatchGemm on the dequantized weights);
//  - int8 keeps the golden greedy output for at least the first 16 tokens (issue 17);
//  - perplexity of a fixed text for float32, int8 and q4, printed (loose bounds only);
//  - tensor parallelism (int8 at tp=2 close to tp=1; q4 where a shard splits a group of
//    16 columns: an error naming it), and bad configurations with clear errors.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/lora_adapter.h"
#include "engine/model/quant_checkpoint.h"
#include "engine/model/quantize.h"
#include "engine/runtime/engine.h"
#include "engine/runtime/model_bundle.h"
#include "engine/shard_weights.h"
#include "tests/forwarding_backend.h"
#include "tests/test_util.h"

namespace superpose {
namespace {

namespace fs = std::filesystem;
using engine::WeightQuant;
using testing::Stories260kDir;

// The fixed text of the perplexity check (TinyStories style, written for this test).
constexpr char kText[] =
    "Once upon a time, there was a little dog named Max. Max liked to run in the big "
    "green park near his house. One day, Max saw a red ball under a tree. He ran to the "
    "ball and picked it up. A little girl named Sue saw Max with her ball. She was sad "
    "because she wanted to play. Max looked at Sue and wagged his tail. He put the ball "
    "down in front of her. Sue smiled and threw the ball far away. Max ran and ran and "
    "brought it back. They played all day until the sun went down. Then Sue said, "
    "\"Thank you, Max. You are my best friend.\" Max was happy, and they went home.";

class QuantModelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    root_ = new std::string(fs::temp_directory_path() /
                            ("superpose-quant-test-" + std::to_string(::getpid())));
    for (WeightQuant kind : {WeightQuant::kInt8, WeightQuant::kQ4}) {
      auto s = engine::QuantizeCheckpoint(Stories260kDir(), Dir(kind), kind);
      ASSERT_TRUE(s.ok()) << s.status();
      EXPECT_GE(s->quantized_tensors, 7 * 5);  // 7 projections x 5 layers (+ a stored lm_head)
    }
  }
  static void TearDownTestSuite() {
    std::error_code ec;
    fs::remove_all(*root_, ec);
    delete root_;
  }
  static std::string Dir(WeightQuant kind) { return *root_ + "/" + engine::WeightQuantName(kind); }

  static engine::ModelBundle Bundle(const std::string& dir) {
    auto b = engine::LoadModelBundle(dir);
    EXPECT_TRUE(b.ok()) << b.status();
    return b.ok() ? std::move(*b) : engine::ModelBundle{};
  }
  static std::unique_ptr<engine::Backend> Backend(const engine::ModelBundle& m,
                                                  engine::cpu::WeightDType dtype, int tp = 1) {
    engine::BackendOptions opts;
    opts.kv_num_blocks = 64;
    opts.tensor_parallel = tp;
    engine::cpu::CpuOptions cpu;
    cpu.dtype = dtype;
    return engine::cpu::MakeCpuBackend(opts, cpu);
  }
  static std::vector<int32_t> Prompt(const engine::ModelBundle& m) {
    return m.tokenizer->Encode("Once upon a time", true);
  }

  static std::string* root_;
};
std::string* QuantModelTest::root_ = nullptr;

using engine::cpu::WeightDType;

TEST_F(QuantModelTest, RoundTripEqualsTheConvertersDequantization) {
  auto src = engine::OpenSafetensors(Stories260kDir());
  ASSERT_TRUE(src.ok());
  for (WeightQuant kind : {WeightQuant::kInt8, WeightQuant::kQ4}) {
    SCOPED_TRACE(engine::WeightQuantName(kind));
    const engine::ModelBundle q = Bundle(Dir(kind));
    ASSERT_EQ(q.config.quantization, kind);
    for (const std::string& name : (*src)->Names()) {
      auto v = (*src)->Get(name);
      ASSERT_TRUE(v.ok());
      if (!engine::IsQuantizableWeight(name)) {  // copied as stored
        auto c = q.weights->Get(name);
        ASSERT_TRUE(c.ok()) << name;
        ASSERT_EQ(c->nbytes, v->nbytes);
        EXPECT_EQ(std::memcmp(c->data, v->data, v->nbytes), 0) << name;
        continue;
      }
      EXPECT_FALSE(q.weights->Has(name));
      const int64_t rows = v->shape[0], cols = v->shape[1];
      auto want = engine::ReadAndQuantize(**src, name, kind, rows, cols);
      auto got = engine::ReadQuantized(*q.weights, engine::QuantBaseName(name), kind, rows, cols);
      ASSERT_TRUE(want.ok() && got.ok()) << name;
      EXPECT_EQ(got->codes, want->codes) << name;
      EXPECT_EQ(got->scales, want->scales) << name;
      EXPECT_EQ(got->lut, want->lut) << name;
    }
    // The float reader of the quantized directory: exactly the dequantized values.
    auto reader = engine::ShardedWeightReader::Create(q.config, *q.weights, engine::Shard{});
    ASSERT_TRUE(reader.ok());
    const int64_t H = q.config.hidden_size;
    std::vector<float> qkv(reader->qkv_rows() * H), want(qkv.size());
    ASSERT_TRUE(reader->Qkv(2, qkv.data()).ok());
    float* at = want.data();
    for (const char* p : {"q_proj", "k_proj", "v_proj"}) {
      const std::string name = absl::StrCat("model.layers.2.self_attn.", p, ".weight");
      auto v = (*src)->Get(name);
      auto t = engine::ReadAndQuantize(**src, name, kind, v->shape[0], v->shape[1]);
      ASSERT_TRUE(t.ok());
      engine::DequantizeRows(*t, 0, t->rows, at);
      at += t->rows * t->cols;
    }
    EXPECT_EQ(qkv, want);
  }
}

TEST_F(QuantModelTest, LoadTimeQuantizationAndFloatReadsMatchTheConvertedDirectory) {
  const engine::ModelBundle f32 = Bundle(Stories260kDir());
  for (WeightQuant kind : {WeightQuant::kInt8, WeightQuant::kQ4}) {
    SCOPED_TRACE(engine::WeightQuantName(kind));
    const engine::ModelBundle q = Bundle(Dir(kind));
    auto converted = Backend(q, WeightDType::kAuto);
    ASSERT_TRUE(converted->Load(q.config, *q.weights, engine::Shard{}).ok());
    EXPECT_EQ(converted->compute_dtype(), engine::WeightQuantName(kind));
    auto at_load = Backend(f32, kind == WeightQuant::kInt8 ? WeightDType::kInt8 : WeightDType::kQ4);
    ASSERT_TRUE(at_load->Load(f32.config, *f32.weights, engine::Shard{}).ok());
    auto as_float = Backend(q, WeightDType::kFloat32);
    ASSERT_TRUE(as_float->Load(q.config, *q.weights, engine::Shard{}).ok());
    EXPECT_EQ(as_float->compute_dtype(), "float32");
    const auto want = testing::RunSteps(*converted, Prompt(q), 8);
    ASSERT_EQ(want.size(), 9u);
    EXPECT_EQ(testing::RunSteps(*at_load, Prompt(q), 8), want);
    EXPECT_EQ(testing::RunSteps(*as_float, Prompt(q), 8), want);
  }
}

// Greedy tokens of every golden case; the length of the prefix equal to the golden one.
std::vector<size_t> GoldenPrefixes(const engine::ModelBundle& m, engine::Backend* backend) {
  const nlohmann::json golden = testing::ReadJson(Stories260kDir() + "/golden.json");
  engine::Engine eng(engine::EngineOptions{}, m.config, m.tokenizer.get(), backend);
  eng.Start();
  std::vector<size_t> out;
  for (const auto& c : golden["generation"]) {
    auto r = testing::RunRequest(eng, testing::GreedyRequest(c["prompt_ids"], 64));
    EXPECT_TRUE(r.status.ok()) << r.status;
    const auto want = c["completion_ids"].get<std::vector<int32_t>>();
    size_t n = 0;
    while (n < r.tokens.size() && n < want.size() && r.tokens[n] == want[n]) ++n;
    out.push_back(n);
  }
  eng.Shutdown(absl::Seconds(1));
  EXPECT_EQ(eng.blocks().free_blocks(), eng.blocks().num_blocks());
  return out;
}

TEST_F(QuantModelTest, Int8KeepsTheGoldenGreedyOutputForSixteenTokens) {
  for (WeightQuant kind : {WeightQuant::kInt8, WeightQuant::kQ4}) {
    const engine::ModelBundle q = Bundle(Dir(kind));
    auto backend = Backend(q, WeightDType::kAuto);
    ASSERT_TRUE(backend->Load(q.config, *q.weights, engine::Shard{}).ok());
    const std::vector<size_t> prefix = GoldenPrefixes(q, backend.get());
    ASSERT_FALSE(prefix.empty());
    for (size_t i = 0; i < prefix.size(); ++i) {
      std::printf("[ quant    ] %s golden case %zu: first %zu of 64 greedy tokens equal\n",
                  engine::WeightQuantName(kind), i, prefix[i]);
      if (kind == WeightQuant::kInt8) {
        EXPECT_GE(prefix[i], 16u) << "case " << i;
      }
    }
  }
}

// exp(-mean log p(token | previous tokens)) of kText, one prefill with a log-probability
// request per position.
double Perplexity(const engine::ModelBundle& m, engine::Backend& b) {
  const std::vector<int32_t> ids = m.tokenizer->Encode(kText, true);
  EXPECT_LT(ids.size(), 500u);
  engine::BatchPlan plan;
  plan.seqs.resize(1);
  for (size_t i = 0; i < ids.size(); ++i) {
    plan.tokens.push_back(ids[i]);
    plan.positions.push_back(static_cast<float>(i));
    plan.kv_slots.push_back({static_cast<int32_t>(i / 16), static_cast<int32_t>(i % 16)});
    if (i + 1 < ids.size()) plan.logprobs.push_back({static_cast<int32_t>(i), ids[i + 1]});
  }
  plan.seqs[0].num_tokens = static_cast<int32_t>(ids.size());
  engine::ForwardOutput out;
  const absl::Status s = b.Forward(plan, &out);
  EXPECT_TRUE(s.ok()) << s;
  double sum = 0;
  for (float lp : out.logprobs) sum += lp;
  return std::exp(-sum / std::max<size_t>(1, out.logprobs.size()));
}

TEST_F(QuantModelTest, PerplexityOfAFixedTextNextToFloat32) {
  const engine::ModelBundle f32 = Bundle(Stories260kDir());
  auto base = Backend(f32, WeightDType::kFloat32);
  ASSERT_TRUE(base->Load(f32.config, *f32.weights, engine::Shard{}).ok());
  const double ppl_f32 = Perplexity(f32, *base);
  std::printf("[ quant    ] stories260k perplexity of the fixed text (%zu tokens): float32 %.4f",
              f32.tokenizer->Encode(kText, true).size(), ppl_f32);
  for (WeightQuant kind : {WeightQuant::kInt8, WeightQuant::kQ4}) {
    const engine::ModelBundle q = Bundle(Dir(kind));
    auto b = Backend(q, WeightDType::kAuto);
    ASSERT_TRUE(b->Load(q.config, *q.weights, engine::Shard{}).ok());
    const double ppl = Perplexity(q, *b);
    std::printf(", %s %.4f (%+.2f%%)", engine::WeightQuantName(kind), ppl,
                100.0 * (ppl / ppl_f32 - 1.0));
    // Sanity bounds only: int8 within 2%, q4 within 2x of float32.
    EXPECT_LT(ppl, ppl_f32 * (kind == WeightQuant::kInt8 ? 1.02 : 2.0));
    EXPECT_GT(ppl, 1.0);
  }
  std::printf("\n");
}

// Prefill plan of several sequences in one step (each in its own KV blocks, from block
// 8 * index); logits of every sequence's last token.
engine::BatchPlan PrefillPlan(const std::vector<std::vector<int32_t>>& prompts,
                              const std::vector<int32_t>& index) {
  engine::BatchPlan plan;
  for (size_t s = 0; s < prompts.size(); ++s) {
    engine::SeqPlan seq;
    seq.id = index[s];
    seq.token_begin = static_cast<int32_t>(plan.tokens.size());
    seq.num_tokens = static_cast<int32_t>(prompts[s].size());
    for (size_t i = 0; i < prompts[s].size(); ++i) {
      plan.tokens.push_back(prompts[s][i]);
      plan.positions.push_back(static_cast<float>(i));
      plan.kv_slots.push_back(
          {8 * index[s] + static_cast<int32_t>(i / 16), static_cast<int32_t>(i % 16)});
    }
    plan.logits_for.push_back(seq.token_begin + seq.num_tokens - 1);
    plan.seqs.push_back(seq);
  }
  return plan;
}

// A sequence's logits do not depend on its batch (QuantGemm inherits SmallBatchGemm's
// batch invariance): three prompts prefilled together equal each prefilled alone.
TEST_F(QuantModelTest, BatchedSequencesEqualEachAlone) {
  const std::vector<std::vector<int32_t>> prompts = {
      {1, 403, 407, 261, 378},
      {1, 300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 311, 312, 313, 314, 315, 316, 317},
      {1, 42}};
  for (WeightQuant kind : {WeightQuant::kInt8, WeightQuant::kQ4}) {
    SCOPED_TRACE(engine::WeightQuantName(kind));
    const engine::ModelBundle q = Bundle(Dir(kind));
    auto b = Backend(q, WeightDType::kAuto);
    ASSERT_TRUE(b->Load(q.config, *q.weights, engine::Shard{}).ok());
    engine::ForwardOutput all;
    ASSERT_TRUE(b->Forward(PrefillPlan(prompts, {0, 1, 2}), &all).ok());
    const size_t V = q.config.vocab_size;
    ASSERT_EQ(all.logits.size(), 3 * V);
    for (int32_t s = 0; s < 3; ++s) {
      engine::ForwardOutput one;
      ASSERT_TRUE(b->Forward(PrefillPlan({prompts[s]}, {s}), &one).ok());
      const std::vector<float> want(all.logits.begin() + s * V, all.logits.begin() + (s + 1) * V);
      EXPECT_EQ(one.logits, want) << "sequence " << s;
    }
  }
}

TEST_F(QuantModelTest, TensorParallelShards) {
  const engine::ModelBundle q = Bundle(Dir(WeightQuant::kInt8));
  auto one = Backend(q, WeightDType::kAuto), two = Backend(q, WeightDType::kAuto, 2);
  ASSERT_TRUE(one->Load(q.config, *q.weights, engine::Shard{}).ok());
  ASSERT_TRUE(two->Load(q.config, *q.weights, engine::Shard{}).ok());
  const auto a = testing::RunSteps(*one, Prompt(q), 4);
  const auto b = testing::RunSteps(*two, Prompt(q), 4, nullptr);
  ASSERT_EQ(a.size(), b.size());
  for (size_t s = 0; s < a.size(); ++s) {
    ASSERT_EQ(a[s].size(), b[s].size());
    for (size_t i = 0; i < a[s].size(); ++i) {
      ASSERT_NEAR(a[s][i], b[s][i], 1e-4 * (1 + std::abs(a[s][i]))) << "step " << s;
    }
  }
  // q4 at tp=2: down_proj's 172 input columns split at 86, inside a group of 16.
  const engine::ModelBundle q4 = Bundle(Dir(WeightQuant::kQ4));
  auto bad = Backend(q4, WeightDType::kAuto, 2);
  const absl::Status s = bad->Load(q4.config, *q4.weights, engine::Shard{});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("down_proj"), std::string::npos) << s;
  EXPECT_NE(s.message().find("multiple of 16"), std::string::npos) << s;
}

// AFM's serving shape (papers.md 3.3, 3.7): LoRA adapters over a quantized base. A B = 0
// adapter gives the quantized base's logits exactly; a random one on the q4 base equals
// the same adapter on the float32 reading of the q4 directory (its dequantized weights,
// the same products), bitwise.
class AdapterRows : public testing::ForwardingBackend {
 public:
  explicit AdapterRows(engine::Backend* inner) : ForwardingBackend(inner) {}
  absl::Status Forward(const engine::BatchPlan& plan, engine::ForwardOutput* out) override {
    engine::BatchPlan p = plan;
    for (auto& s : p.seqs) s.adapter = 1;
    return inner()->Forward(p, out);
  }
};

TEST_F(QuantModelTest, LoraAdaptersOverAQuantizedBase) {
  const engine::ModelBundle q = Bundle(Dir(WeightQuant::kQ4));
  const std::vector<int32_t> modules = {engine::kLoraQ,   engine::kLoraK,    engine::kLoraV,
                                        engine::kLoraO,   engine::kLoraGate, engine::kLoraUp,
                                        engine::kLoraDown};
  auto base = Backend(q, WeightDType::kAuto);
  ASSERT_TRUE(base->Load(q.config, *q.weights, engine::Shard{}).ok());
  const auto want = testing::RunSteps(*base, Prompt(q), 4);
  auto zero = Backend(q, WeightDType::kAuto);
  ASSERT_TRUE(zero->Load(q.config, *q.weights, engine::Shard{}).ok());
  ASSERT_TRUE(zero->LoadAdapter(1, engine::RandomLoraAdapter(q.config, 16, 16.0f, modules, 3, 0.5f,
                                                             /*b_zero=*/true))
                  .ok());
  AdapterRows z(zero.get());
  EXPECT_EQ(testing::RunSteps(z, Prompt(q), 4), want);

  const engine::LoraAdapter a = engine::RandomLoraAdapter(q.config, 8, 16.0f, modules, 5, 0.1f);
  auto on_q4 = Backend(q, WeightDType::kAuto), on_f32 = Backend(q, WeightDType::kFloat32);
  ASSERT_TRUE(on_q4->Load(q.config, *q.weights, engine::Shard{}).ok());
  ASSERT_TRUE(on_f32->Load(q.config, *q.weights, engine::Shard{}).ok());
  ASSERT_TRUE(on_q4->LoadAdapter(1, a).ok());
  ASSERT_TRUE(on_f32->LoadAdapter(1, a).ok());
  AdapterRows aq(on_q4.get()), af(on_f32.get());
  const auto got = testing::RunSteps(aq, Prompt(q), 4);
  EXPECT_EQ(got, testing::RunSteps(af, Prompt(q), 4));
  EXPECT_NE(got, want);  // the adapter does change the logits
}

// Cross-layer weight sharing (config.json layer_weight_map) with quantized weights:
// layers 1 and 3 absent from the checkpoint and mapped to 0 and 2 compute what the model
// with those layers' weights copied computes, at int8 and q4 (quantized at load).
TEST_F(QuantModelTest, SharedLayersReadTheirMappedWeights) {
  const engine::ModelBundle f32 = Bundle(Stories260kDir());
  const std::vector<int32_t> map = {0, 0, 2, 2, 4};
  engine::InMemoryWeights shared, copied;
  for (const std::string& name : f32.weights->Names()) {
    auto view = f32.weights->Get(name);
    ASSERT_TRUE(view.ok());
    std::vector<float> data(view->numel());
    ASSERT_TRUE(f32.weights->ReadF32(name, view->shape, data.data()).ok());
    const int32_t layer = name.rfind("model.layers.", 0) == 0 ? std::stoi(name.substr(13)) : -1;
    if (layer < 0 || map[layer] == layer) shared.Add(name, view->shape, data);
    for (int32_t l = 0; l < 5; ++l) {
      if (layer < 0 && l > 0) break;
      if (layer >= 0 && map[l] != layer) continue;
      copied.Add(
          layer < 0 ? name : absl::StrCat("model.layers.", l, name.substr(name.find('.', 13))),
          view->shape, data);
    }
  }
  engine::ModelConfig with_map = f32.config;
  with_map.layer_weight_map = map;
  for (WeightDType dtype : {WeightDType::kInt8, WeightDType::kQ4}) {
    auto a = Backend(f32, dtype), b = Backend(f32, dtype);
    ASSERT_TRUE(a->Load(with_map, shared, engine::Shard{}).ok());
    ASSERT_TRUE(b->Load(f32.config, copied, engine::Shard{}).ok());
    EXPECT_EQ(testing::RunSteps(*a, Prompt(f32), 4), testing::RunSteps(*b, Prompt(f32), 4));
  }
}

TEST(QuantOptionsTest, CpuDtypeParsesInt8AndQ4) {
  auto o = engine::cpu::ParseCpuOptions({{"cpu_dtype", "int8"}});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->dtype, WeightDType::kInt8);
  o = engine::cpu::ParseCpuOptions({{"cpu_dtype", "q4"}});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->dtype, WeightDType::kQ4);
}

TEST_F(QuantModelTest, BadConfigurationsFailClearly) {
  const engine::ModelBundle q = Bundle(Dir(WeightQuant::kInt8));
  auto other = Backend(q, WeightDType::kQ4);
  const absl::Status s = other->Load(q.config, *q.weights, engine::Shard{});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("already quantized (int8)"), std::string::npos) << s;

  std::ifstream in(Dir(WeightQuant::kInt8) + "/config.json");
  nlohmann::json config = nlohmann::json::parse(in);
  config["quantization_config"]["quant_method"] = "gptq";
  auto parsed = engine::ParseModelConfig(config.dump(), "config.json");
  EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(parsed.status().message().find("quantization_config.quant_method"), std::string::npos)
      << parsed.status();
  config["quantization_config"] = {{"quant_method", "superpose"}, {"weights", "int3"}};
  parsed = engine::ParseModelConfig(config.dump(), "config.json");
  EXPECT_NE(parsed.status().message().find("quantization_config.weights"), std::string::npos)
      << parsed.status();

  // A checkpoint converted twice, or into itself.
  EXPECT_EQ(engine::QuantizeCheckpoint(Dir(WeightQuant::kInt8), *root_ + "/again", WeightQuant::kQ4)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace superpose
