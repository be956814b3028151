// LazyLLM through the engine (engine/runtime/lazy_steps.h): the request option, its
// checks, the auto-off rules, greedy decoding that follows the dense reference, usage,
// a cached prefix reused but never pruned nor published, and preemption replaying the
// pruning decision.
#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "engine/runtime/engine.h"
#include "engine/runtime/model_bundle.h"
#include "engine/runtime/scheduler.h"
#include "tests/forwarding_backend.h"
#include "tests/lazy_reference.h"
#include "tests/test_util.h"

namespace superpose {
namespace {

using engine::LazyOptions;

class LazyEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = engine::LoadModelBundle("");
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::make_unique<engine::ModelBundle>(std::move(*m));
  }
  std::unique_ptr<engine::Engine> Start(int32_t kv_blocks, engine::EngineOptions eo = {}) {
    engine::BackendOptions o;
    o.kv_num_blocks = kv_blocks;
    backend_ = engine::cpu::MakeCpuBackend(o);
    EXPECT_TRUE(backend_->Load(model_->config, *model_->weights, engine::Shard{}).ok());
    if (eo.lazy.min_prompt == engine::LazyEngineOptions{}.min_prompt) eo.lazy.min_prompt = 16;
    auto e = std::make_unique<engine::Engine>(eo, model_->config, model_->tokenizer.get(),
                                              backend_.get());
    e->Start();
    return e;
  }
  static std::vector<int32_t> Prompt(int32_t n, int32_t salt) {
    std::vector<int32_t> p;
    for (int32_t i = 0; i < n; ++i) p.push_back(static_cast<int32_t>((i * 29 + salt * 7) % 250));
    return p;
  }
  static engine::Request Lazy(std::vector<int32_t> prompt, int32_t new_tokens,
                              std::vector<int32_t> b, std::vector<float> keep) {
    engine::Request r = testing::GreedyRequest(std::move(prompt), new_tokens);
    r.lazy.mode = LazyOptions::Mode::kOn;
    r.lazy.boundaries = std::move(b);
    r.lazy.keep = std::move(keep);
    return r;
  }

  std::unique_ptr<engine::ModelBundle> model_;
  std::unique_ptr<engine::Backend> backend_;
};

TEST_F(LazyEngineTest, GreedyFollowsTheDenseReference) {
  auto eng = Start(64);
  const std::vector<int32_t> p = Prompt(40, 1), b = {0, 1, 2};
  const std::vector<float> keep = {0.7f, 0.7f, 0.7f};
  const testing::Completion c = testing::RunRequest(*eng, Lazy(p, 6, b, keep));
  ASSERT_TRUE(c.status.ok()) << c.status;
  ASSERT_EQ(c.tokens.size(), 6u);
  const testing::LazyReference ref(model_->config, *model_->weights);
  const auto first = ref.Run(p, b, keep);
  EXPECT_EQ(c.usage.lazy_boundaries, b);
  std::vector<int32_t> stages(4, 0);
  for (int32_t d : first.depth) {
    for (int32_t s = 0; s < d; ++s) ++stages[s];
  }
  EXPECT_EQ(c.usage.lazy_stage_tokens, stages);
  EXPECT_LT(stages.back(), 40);
  EXPECT_TRUE(c.usage.lazy_skipped.empty());
  // Each token: the reference's argmax (where it is clear) given the tokens before.
  std::vector<int32_t> seq = p, depth = first.depth;
  for (size_t i = 0; i < c.tokens.size(); ++i) {
    const auto r = i == 0 ? first : ref.Run(seq, b, keep, depth);
    std::vector<double> sorted = r.logits;
    std::sort(sorted.rbegin(), sorted.rend());
    const int32_t best =
        static_cast<int32_t>(std::max_element(r.logits.begin(), r.logits.end()) - r.logits.begin());
    if (sorted[0] - sorted[1] > 1e-3 * std::abs(sorted[0])) {
      EXPECT_EQ(c.tokens[i], best) << i;
    }
    seq.push_back(c.tokens[i]);
    depth.push_back(4);
  }
}

TEST_F(LazyEngineTest, RejectsBadOptionsNamingTheField) {
  auto eng = Start(64);
  auto code_and_msg = [&](std::vector<int32_t> b, std::vector<float> k) {
    return testing::RunRequest(*eng, Lazy(Prompt(20, 2), 2, b, k)).status;
  };
  absl::Status st = code_and_msg({1, 1}, {0.5f, 0.5f});
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("lazy.boundary_layers[1]"), std::string::npos) << st;
  st = code_and_msg({1, 4}, {0.5f, 0.5f});
  EXPECT_NE(st.message().find("lazy.boundary_layers[1]"), std::string::npos) << st;
  st = code_and_msg({1}, {1.5f});
  EXPECT_NE(st.message().find("lazy.keep_fractions[0]"), std::string::npos) << st;
  st = code_and_msg({1}, {0.0f});
  EXPECT_NE(st.message().find("lazy.keep_fractions[0]"), std::string::npos) << st;
  st = code_and_msg({1, 2}, {0.5f});
  EXPECT_NE(st.message().find("lazy.keep_fractions"), std::string::npos) << st;
  // The engine keeps serving.
  EXPECT_TRUE(testing::RunRequest(*eng, Lazy(Prompt(20, 2), 2, {}, {})).status.ok());
}

TEST_F(LazyEngineTest, PaperScheduleAndAutoOff) {
  EXPECT_EQ(engine::PaperLazySchedule(32).boundaries, (std::vector<int32_t>{8, 18, 27}));
  EXPECT_EQ(engine::PaperLazySchedule(4).boundaries, (std::vector<int32_t>{0, 1, 3}));
  engine::EngineOptions eo;
  eo.max_batch_tokens = 64;
  eo.lazy.default_schedule = engine::PaperLazySchedule(model_->config.num_layers);
  auto eng = Start(64, eo);
  // The server default applies to a request that does not choose.
  testing::Completion c = testing::RunRequest(*eng, testing::GreedyRequest(Prompt(30, 3), 2));
  ASSERT_TRUE(c.status.ok());
  EXPECT_EQ(c.usage.lazy_boundaries, (std::vector<int32_t>{0, 1, 3}));
  // Off when asked, below lazy_min_prompt, and above one step's tokens.
  engine::Request off = testing::GreedyRequest(Prompt(30, 3), 2);
  off.lazy.mode = LazyOptions::Mode::kOff;
  c = testing::RunRequest(*eng, off);
  EXPECT_TRUE(c.usage.lazy_stage_tokens.empty() && c.usage.lazy_skipped.empty());
  c = testing::RunRequest(*eng, Lazy(Prompt(10, 3), 2, {}, {}));
  EXPECT_TRUE(c.usage.lazy_stage_tokens.empty());
  EXPECT_NE(c.usage.lazy_skipped.find("lazy_min_prompt"), std::string::npos);
  c = testing::RunRequest(*eng, Lazy(Prompt(100, 3), 2, {}, {}));
  ASSERT_TRUE(c.status.ok());
  EXPECT_NE(c.usage.lazy_skipped.find("max_batch_tokens"), std::string::npos);
}

// A lazy request reuses a cached prefix as computed (in every stage, never pruned),
// follows the dense reference with that prefix fixed, and publishes nothing of its own.
TEST_F(LazyEngineTest, CachedPrefixIsReusedNeverPrunedAndNotPublished) {
  auto eng = Start(64);
  const std::vector<int32_t> p = Prompt(50, 4), b = {0, 2};
  const std::vector<float> keep = {0.5f, 0.5f};
  // A plain request publishes the prompt's three full blocks.
  ASSERT_TRUE(testing::RunRequest(*eng, testing::GreedyRequest(p, 2)).status.ok());
  std::vector<int32_t> longer = p;
  for (int32_t t : Prompt(30, 5)) longer.push_back(t);
  const testing::Completion lazy = testing::RunRequest(*eng, Lazy(longer, 1, b, keep));
  ASSERT_TRUE(lazy.status.ok()) << lazy.status;
  EXPECT_EQ(lazy.usage.cached_prompt_tokens, 48);
  const testing::LazyReference ref(model_->config, *model_->weights);
  const auto want = ref.Run(longer, b, keep, {}, /*fixed=*/48);
  std::vector<int32_t> stages(3, 0);  // the tokens this request computed, per stage
  for (size_t i = 48; i < want.depth.size(); ++i) {
    for (int32_t s = 0; s < want.depth[i]; ++s) ++stages[s];
  }
  EXPECT_EQ(lazy.usage.lazy_stage_tokens, stages);
  EXPECT_LT(stages.back(), 32);
  std::vector<double> sorted = want.logits;
  std::sort(sorted.rbegin(), sorted.rend());
  if (sorted[0] - sorted[1] > 1e-3 * std::abs(sorted[0])) {
    EXPECT_EQ(lazy.tokens.at(0),
              std::max_element(want.logits.begin(), want.logits.end()) - want.logits.begin());
  }
  // Nothing of the lazy request was published: the same prompt, plain, finds the plain
  // request's three blocks and not the lazy one's fourth.
  const testing::Completion plain = testing::RunRequest(*eng, testing::GreedyRequest(longer, 2));
  EXPECT_EQ(plain.usage.cached_prompt_tokens, 48);
}

// Two lazy requests that do not fit the pool together: the preempted one recomputes
// with its recorded decision and produces what it produces alone.
TEST_F(LazyEngineTest, PreemptionReplaysTheDecision) {
  const std::vector<int32_t> a = Prompt(40, 5), b = Prompt(40, 6);
  const std::vector<int32_t> bounds = {0, 2};
  const std::vector<float> keep = {0.5f, 0.5f};
  std::vector<testing::Completion> alone;
  {
    auto eng = Start(64);
    alone.push_back(testing::RunRequest(*eng, Lazy(a, 40, bounds, keep)));
    alone.push_back(testing::RunRequest(*eng, Lazy(b, 40, bounds, keep)));
  }
  auto eng = Start(8);  // 128 slots: the two need 160
  const std::vector<testing::Completion> both =
      testing::RunTogether(*eng, {Lazy(a, 40, bounds, keep), Lazy(b, 40, bounds, keep)});
  const testing::Completion &ra = both[0], &rb = both[1];
  EXPECT_GT(eng->stats().preemptions, 0);
  ASSERT_TRUE(ra.status.ok() && rb.status.ok());
  EXPECT_EQ(ra.tokens, alone[0].tokens);
  EXPECT_EQ(rb.tokens, alone[1].tokens);
  EXPECT_EQ(ra.usage.lazy_stage_tokens, alone[0].usage.lazy_stage_tokens);
  EXPECT_EQ(rb.usage.lazy_stage_tokens, alone[1].usage.lazy_stage_tokens);
  EXPECT_EQ(eng->blocks().free_blocks(), 8);
}

}  // namespace
}  // namespace superpose

namespace superpose {
namespace {

// A backend without LazyLLM: requests that ask get UNIMPLEMENTED, the server default
// is dropped.
TEST(LazyBackendSupportTest, UnsupportedBackend) {
  struct NoLazy : testing::ForwardingBackend {
    using ForwardingBackend::ForwardingBackend;
    bool SupportsLazy() const override { return false; }
  };
  auto m = engine::LoadModelBundle("");
  ASSERT_TRUE(m.ok());
  engine::BackendOptions o;
  o.kv_num_blocks = 32;
  auto cpu = engine::cpu::MakeCpuBackend(o);
  ASSERT_TRUE(cpu->Load(m->config, *m->weights, engine::Shard{}).ok());
  NoLazy backend(cpu.get());
  engine::EngineOptions eo;
  eo.lazy.min_prompt = 4;
  eo.lazy.default_schedule = engine::PaperLazySchedule(m->config.num_layers);
  engine::Engine eng(eo, m->config, m->tokenizer.get(), &backend);
  eng.Start();
  engine::Request r = testing::GreedyRequest({256, 72, 101, 108, 108, 111, 32, 119}, 2);
  testing::Completion c = testing::RunRequest(eng, r);
  ASSERT_TRUE(c.status.ok());
  EXPECT_TRUE(c.usage.lazy_boundaries.empty() && c.usage.lazy_skipped.empty());
  r.lazy.mode = LazyOptions::Mode::kOn;
  c = testing::RunRequest(eng, r);
  EXPECT_EQ(c.status.code(), absl::StatusCode::kUnimplemented);
}

// The scheduler gives a deciding lazy prefill all of its tokens in one step or waits.
TEST(LazySchedulerTest, WholePrefillWaitsForTheBudget) {
  engine::Snapshot snap;
  snap.free_blocks = 100;
  snap.running.push_back({10, 11, -1, 1, 1});  // decoding: 1 token
  engine::SeqSnapshot w;
  w.total = 40;
  snap.waiting.push_back(w);
  const engine::SchedulerLimits limits{32, 8, 16};
  engine::Decision d = engine::Schedule(snap, limits);
  ASSERT_EQ(d.scheduled.size(), 2u);  // chunked: 31 tokens
  EXPECT_EQ(d.scheduled[1].num_tokens, 31);
  snap.waiting[0].whole = true;
  d = engine::Schedule(snap, limits);
  ASSERT_EQ(d.scheduled.size(), 1u);  // waits
  snap.waiting[0].total = 31;
  d = engine::Schedule(snap, limits);
  ASSERT_EQ(d.scheduled.size(), 2u);  // fits whole
  EXPECT_EQ(d.scheduled[1].num_tokens, 31);
}

}  // namespace
}  // namespace superpose
