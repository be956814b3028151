// LoRA adapters through the engine (engine/runtime/adapters.h): requests with different
// adapters batched together get the tokens and log-probabilities they get alone; the
// prefix cache and the RAG path cache never share KV across adapters; the residency
// manager evicts the least recently used adapter no request holds, reloads evicted ones
// on demand and refuses when every resident adapter is held; bad names are refused
// naming adapter_id.
#include <gtest/gtest.h>

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "engine/lora_adapter.h"
#include "engine/runtime/adapters.h"
#include "engine/runtime/engine.h"
#include "engine/runtime/model_bundle.h"
#include "tests/forwarding_backend.h"
#include "tests/lora_reference.h"
#include "tests/test_util.h"

namespace superpose {
namespace {

using testing::Collector;
using testing::Completion;

const std::vector<int32_t> kAll = {engine::kLoraQ,   engine::kLoraK,    engine::kLoraV,
                                   engine::kLoraO,   engine::kLoraGate, engine::kLoraUp,
                                   engine::kLoraDown};

class LoraEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = engine::LoadModelBundle(testing::Stories260kDir());
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::make_unique<engine::ModelBundle>(*std::move(m));
    root_ =
        (std::filesystem::temp_directory_path() / ("lora_engine_test_" + std::to_string(getpid())))
            .string();
    for (int i = 1; i <= 3; ++i) {
      const std::string dir = root_ + "/a" + std::to_string(i);
      auto a = engine::RandomLoraAdapter(model_->config, 8 * i, 16.0f, kAll, 100 + i, 0.1f);
      ASSERT_TRUE(engine::WritePeftAdapter(dir, a, engine::DType::kBF16).ok());
      dirs_.push_back(dir);
    }
    engine::BackendOptions opts;
    opts.kv_num_blocks = 256;
    backend_ = engine::cpu::MakeCpuBackend(opts);
    ASSERT_TRUE(backend_->Load(model_->config, *model_->weights, engine::Shard{}).ok());
  }
  void TearDown() override {
    engine_.reset();
    adapters_.reset();
    std::filesystem::remove_all(root_);
  }
  // The manager (max_resident) with a1..a3 added, and an engine serving them.
  void Start(int32_t max_resident, engine::Backend* backend = nullptr) {
    backend = backend != nullptr ? backend : backend_.get();
    adapters_ = std::make_unique<engine::AdapterManager>(backend, model_->config, max_resident);
    for (int i = 0; i < 3; ++i) {
      ASSERT_TRUE(adapters_->Add("a" + std::to_string(i + 1), dirs_[i]).ok());
    }
    engine_ = std::make_unique<engine::Engine>(engine::EngineOptions{}, model_->config,
                                               model_->tokenizer.get(), backend);
    engine_->SetAdapters(adapters_.get());
    engine_->Start();
  }
  engine::Request Req(std::vector<int32_t> prompt, const std::string& adapter, int32_t n = 12) {
    engine::Request r = testing::GreedyRequest(std::move(prompt), n);
    r.adapter_id = adapter;
    r.logprobs = true;
    r.top_logprobs = 3;
    return r;
  }
  std::vector<int32_t> Prompt(int32_t len, int32_t seed) const {
    std::vector<int32_t> p = {1};
    for (int32_t i = 1; i < len; ++i) p.push_back(3 + (seed * 37 + i * 11) % 500);
    return p;
  }

  std::unique_ptr<engine::ModelBundle> model_;
  std::string root_;
  std::vector<std::string> dirs_;
  std::unique_ptr<engine::Backend> backend_;
  std::unique_ptr<engine::AdapterManager> adapters_;
  std::unique_ptr<engine::Engine> engine_;
};

void ExpectSame(const Completion& a, const Completion& b, const std::string& what) {
  ASSERT_TRUE(a.status.ok()) << what << ": " << a.status;
  ASSERT_TRUE(b.status.ok()) << what << ": " << b.status;
  EXPECT_EQ(a.tokens, b.tokens) << what;
  ASSERT_EQ(a.logprobs.size(), b.logprobs.size()) << what;
  for (size_t i = 0; i < a.logprobs.size(); ++i) {
    EXPECT_EQ(a.logprobs[i].chosen.logprob, b.logprobs[i].chosen.logprob) << what << " token " << i;
    ASSERT_EQ(a.logprobs[i].top.size(), b.logprobs[i].top.size());
    for (size_t k = 0; k < a.logprobs[i].top.size(); ++k) {
      EXPECT_EQ(a.logprobs[i].top[k].token_id, b.logprobs[i].top[k].token_id);
      EXPECT_EQ(a.logprobs[i].top[k].logprob, b.logprobs[i].top[k].logprob);
    }
  }
}

TEST_F(LoraEngineTest, MixedAdapterBatchEqualsEachRequestAlone) {
  Start(3);
  const std::vector<std::string> which = {"a1", "", "a2", "a1", "a3", ""};
  std::vector<Collector> cs(which.size());
  for (size_t i = 0; i < which.size(); ++i) {
    ASSERT_TRUE(engine_->Submit(Req(Prompt(9 + i, i), which[i]), cs[i].Callback()).ok());
  }
  std::vector<Completion> batched;
  for (auto& c : cs) batched.push_back(c.Wait());
  // Alone, on a fresh engine (no prefix cache from the batch).
  engine_.reset();
  Start(3);
  for (size_t i = 0; i < which.size(); ++i) {
    const Completion alone = testing::RunRequest(*engine_, Req(Prompt(9 + i, i), which[i]));
    ExpectSame(batched[i], alone, "request " + std::to_string(i) + " adapter '" + which[i] + "'");
  }
  // The adapters do change the output.
  const Completion base = testing::RunRequest(*engine_, Req(Prompt(9, 0), ""));
  EXPECT_NE(base.logprobs[0].chosen.logprob, batched[0].logprobs[0].chosen.logprob);
}

TEST_F(LoraEngineTest, PrefixCacheIsKeyedByAdapter) {
  Start(3);
  const std::vector<int32_t> p = Prompt(40, 5);  // two full blocks of 16
  const Completion base = testing::RunRequest(*engine_, Req(p, ""));
  ASSERT_TRUE(base.status.ok()) << base.status;
  EXPECT_EQ(base.usage.cached_prompt_tokens, 0);
  const Completion a1 = testing::RunRequest(*engine_, Req(p, "a1"));
  EXPECT_EQ(a1.usage.cached_prompt_tokens, 0) << "base blocks reused by an adapter";
  const Completion a2 = testing::RunRequest(*engine_, Req(p, "a2"));
  EXPECT_EQ(a2.usage.cached_prompt_tokens, 0) << "a1's blocks reused by a2";
  const Completion a1_again = testing::RunRequest(*engine_, Req(p, "a1"));
  EXPECT_EQ(a1_again.usage.cached_prompt_tokens, 32);
  ExpectSame(a1, a1_again, "a1 from its own cached prefix");
  const Completion base_again = testing::RunRequest(*engine_, Req(p, ""));
  EXPECT_EQ(base_again.usage.cached_prompt_tokens, 32);
  ExpectSame(base, base_again, "base from its cached prefix");
}

TEST_F(LoraEngineTest, RagPathCacheIsKeyedByAdapter) {
  Start(3);
  engine::rag::Spec spec;
  spec.preamble = Prompt(20, 1);
  spec.documents = {Prompt(18, 2), Prompt(21, 3), Prompt(17, 4)};
  for (auto& d : spec.documents) d.erase(d.begin());  // no BOS inside
  spec.query = {40, 41, 42, 43};
  spec.postamble = {50, 51};
  auto rag = [&](const std::string& adapter) {
    engine::Request r = testing::GreedyRequest({}, 6);
    r.rag = std::make_shared<engine::rag::Spec>(spec);
    r.adapter_id = adapter;
    return testing::RunRequest(*engine_, std::move(r));
  };
  const Completion a1 = rag("a1");
  ASSERT_TRUE(a1.status.ok()) << a1.status;
  const Completion a2 = rag("a2");
  ASSERT_TRUE(a2.status.ok()) << a2.status;
  for (const auto& d : a2.rag->docs) EXPECT_FALSE(d.cached) << "a1's document KV served to a2";
  const Completion a1_again = rag("a1");
  ASSERT_TRUE(a1_again.status.ok());
  for (const auto& d : a1_again.rag->docs) EXPECT_TRUE(d.cached);
  EXPECT_EQ(a1.tokens, a1_again.tokens);
  const Completion base = rag("");
  for (const auto& d : base.rag->docs) EXPECT_FALSE(d.cached);
}

TEST_F(LoraEngineTest, LruEvictsUnheldAdaptersAndReloadsOnDemand) {
  Start(2);
  // a1, a2 loaded; adding a3 evicted a1 (least recently used, held by none).
  auto resident = [&] {
    std::vector<std::string> r;
    for (const auto& i : adapters_->List()) {
      if (i.resident) r.push_back(i.name);
    }
    return r;
  };
  EXPECT_EQ(resident(), (std::vector<std::string>{"a2", "a3"}));
  EXPECT_EQ(adapters_->counters().evictions, 1);
  // A request for a1 reloads it from its path (evicting a2) and equals a fresh a1.
  const Completion r1 = testing::RunRequest(*engine_, Req(Prompt(10, 9), "a1"));
  ASSERT_TRUE(r1.status.ok()) << r1.status;
  EXPECT_EQ(resident(), (std::vector<std::string>{"a1", "a3"}));
  EXPECT_EQ(adapters_->counters().loads, 4);
  // Held adapters are pinned: with a1 and a3 held, a2 cannot be made resident.
  auto pin1 = adapters_->Acquire("a1");
  auto pin3 = adapters_->Acquire("a3");
  ASSERT_TRUE(pin1.ok() && pin3.ok());
  const Completion busy = testing::RunRequest(*engine_, Req(Prompt(10, 9), "a2"));
  EXPECT_EQ(busy.status.code(), absl::StatusCode::kResourceExhausted) << busy.status;
  EXPECT_NE(busy.status.message().find("adapter_id"), std::string::npos);
  pin3->reset();
  const Completion r2 = testing::RunRequest(*engine_, Req(Prompt(10, 9), "a2"));
  ASSERT_TRUE(r2.status.ok()) << r2.status;
  EXPECT_EQ(resident(), (std::vector<std::string>{"a1", "a2"}));
  EXPECT_NE(r1.tokens, std::vector<int32_t>{});
  // Removed while held: gone by name at once, unloaded when the last holder goes.
  ASSERT_TRUE(adapters_->Remove("a1").ok());
  EXPECT_FALSE(adapters_->Has("a1"));
  EXPECT_EQ(adapters_->counters().resident, 2);
  pin1->reset();
  EXPECT_EQ(adapters_->counters().resident, 1);
  EXPECT_EQ(adapters_->Remove("a1").code(), absl::StatusCode::kNotFound);
  // Same name again: a new id, so nothing cached under the old one is reused.
  ASSERT_TRUE(adapters_->Add("a1", dirs_[0]).ok());
  EXPECT_EQ(adapters_->Add("a1", dirs_[0]).code(), absl::StatusCode::kAlreadyExists);
  const Completion r3 = testing::RunRequest(*engine_, Req(Prompt(10, 9), "a1"));
  ASSERT_TRUE(r3.status.ok());
  EXPECT_EQ(r3.tokens, r1.tokens);
}

TEST_F(LoraEngineTest, BadAdapterIdsAreRefusedNamingTheField) {
  Start(2);
  const Completion unknown = testing::RunRequest(*engine_, Req(Prompt(8, 1), "nope"));
  EXPECT_EQ(unknown.status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(unknown.status.message().find("adapter_id"), std::string::npos);
  // The engine keeps serving.
  EXPECT_TRUE(testing::RunRequest(*engine_, Req(Prompt(8, 1), "a2")).status.ok());
  // A bad directory is refused at Add, naming the problem.
  EXPECT_FALSE(adapters_->Add("bad", root_ + "/none").ok());
  EXPECT_EQ(adapters_->Add("bad name", dirs_[0]).code(), absl::StatusCode::kInvalidArgument);
  // An engine without adapters.
  engine::Engine plain(engine::EngineOptions{}, model_->config, model_->tokenizer.get(),
                       backend_.get());
  plain.Start();
  const Completion none = testing::RunRequest(plain, Req(Prompt(8, 1), "a1"));
  EXPECT_EQ(none.status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(none.status.message().find("adapter_id"), std::string::npos);
}

// A backend without adapters (as the CUDA backend): UNIMPLEMENTED naming adapter_id.
class NoAdapters : public testing::ForwardingBackend {
 public:
  using ForwardingBackend::ForwardingBackend;
  bool SupportsAdapters() const override { return false; }
};

TEST_F(LoraEngineTest, BackendWithoutAdaptersRefusesThem) {
  NoAdapters b(backend_.get());
  engine::AdapterManager m(&b, model_->config, 2);
  EXPECT_EQ(m.Add("a1", dirs_[0]).code(), absl::StatusCode::kUnimplemented);
  engine::Engine eng(engine::EngineOptions{}, model_->config, model_->tokenizer.get(), &b);
  eng.SetAdapters(&m);
  eng.Start();
  const Completion r = testing::RunRequest(eng, Req(Prompt(8, 1), "a1"));
  EXPECT_EQ(r.status.code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(r.status.message().find("adapter_id"), std::string::npos);
  EXPECT_TRUE(testing::RunRequest(eng, Req(Prompt(8, 1), "")).status.ok());
}

// LazyLLM pruning with an adapter: the hooks follow the rows a prune keeps. Equals the
// same lazy request on the merged dense model (W + s B A) within float32 rounding.
TEST_F(LoraEngineTest, LazyPruningWithAnAdapterEqualsTheMergedDenseModel) {
  engine::EngineOptions eo;
  eo.lazy.min_prompt = 16;
  adapters_ = std::make_unique<engine::AdapterManager>(backend_.get(), model_->config, 2);
  ASSERT_TRUE(adapters_->Add("a1", dirs_[0]).ok());
  engine::Engine with(eo, model_->config, model_->tokenizer.get(), backend_.get());
  with.SetAdapters(adapters_.get());
  with.Start();
  auto a1 = engine::LoadPeftAdapter(dirs_[0], model_->config);
  ASSERT_TRUE(a1.ok());
  auto merged = testing::MergedLoraWeights(*model_, *a1);
  engine::BackendOptions opts;
  opts.kv_num_blocks = 256;
  auto dense_backend = engine::cpu::MakeCpuBackend(opts);
  ASSERT_TRUE(dense_backend->Load(model_->config, *merged, engine::Shard{}).ok());
  engine::Engine dense(eo, model_->config, model_->tokenizer.get(), dense_backend.get());
  dense.Start();
  auto lazy = [&](const std::string& adapter) {
    engine::Request r = Req(Prompt(48, 3), adapter, 8);
    r.lazy.mode = engine::LazyOptions::Mode::kOn;
    r.lazy.boundaries = {1, 3};
    r.lazy.keep = {0.6f, 0.5f};
    return r;
  };
  const Completion got = testing::RunRequest(with, lazy("a1"));
  const Completion want = testing::RunRequest(dense, lazy(""));
  ASSERT_TRUE(got.status.ok()) << got.status;
  ASSERT_TRUE(want.status.ok()) << want.status;
  EXPECT_EQ(got.usage.lazy_stage_tokens, want.usage.lazy_stage_tokens);
  EXPECT_EQ(got.usage.lazy_stage_tokens.size(), 3u);
  EXPECT_EQ(got.tokens, want.tokens);
  ASSERT_EQ(got.logprobs.size(), want.logprobs.size());
  for (size_t i = 0; i < got.logprobs.size(); ++i) {
    EXPECT_NEAR(got.logprobs[i].chosen.logprob, want.logprobs[i].chosen.logprob, 1e-4) << i;
  }
}

TEST(AdapterFlagTest, ParsesNamesAndDirectories) {
  auto ok = engine::ParseAdapterFlag("sql=/a/b,chat=/c=d");
  ASSERT_TRUE(ok.ok());
  ASSERT_EQ(ok->size(), 2u);
  EXPECT_EQ((*ok)[1].first, "chat");
  EXPECT_EQ((*ok)[1].second, "/c=d");
  EXPECT_TRUE(engine::ParseAdapterFlag("")->empty());
  EXPECT_FALSE(engine::ParseAdapterFlag("x").ok());
  EXPECT_FALSE(engine::ParseAdapterFlag("a b=/x").ok());
  EXPECT_FALSE(engine::ParseAdapterFlag("a=").ok());
}

}  // namespace
}  // namespace superpose
