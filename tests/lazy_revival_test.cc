// LazyLLM decode-time revival (papers.md 2.2; docs/architecture.md "LazyLLM"): a decode
// step's token reselects each stage's best keys and revives the selected tokens that
// lack K/V in the next stage from the Aux Cache. Backend: a revived token's K/V is
// bitwise what a prefill that had kept it holds, and each is computed once per layer.
// Engine: keep 1.0 revives nothing and is the baseline; revivals are counted and the Aux
// Cache is freed; batched equals alone; a preempted sequence replays its revivals.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "engine/runtime/engine.h"
#include "engine/runtime/lazy_steps.h"
#include "engine/runtime/model_bundle.h"
#include "tests/forwarding_backend.h"
#include "tests/test_util.h"

namespace superpose {
namespace {

using engine::BatchPlan;
using engine::ForwardOutput;
using engine::LazyOptions;

class LazyRevivalTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = engine::LoadModelBundle("");  // built-in: 4 layers, GQA 4/2 heads
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::make_unique<engine::ModelBundle>(std::move(*m));
  }
  std::unique_ptr<engine::Backend> MakeBackend(int32_t kv_blocks) const {
    engine::BackendOptions o;
    o.kv_num_blocks = kv_blocks;
    auto b = engine::cpu::MakeCpuBackend(o);
    EXPECT_TRUE(b->Load(model_->config, *model_->weights, engine::Shard{}).ok());
    return b;
  }
  std::unique_ptr<engine::Engine> Start(int32_t kv_blocks, int64_t aux_budget = 1 << 20) {
    backend_ = MakeBackend(kv_blocks);
    engine::EngineOptions eo;
    eo.lazy.min_prompt = 16;
    eo.lazy.aux_budget_bytes = aux_budget;
    auto e = std::make_unique<engine::Engine>(eo, model_->config, model_->tokenizer.get(),
                                              backend_.get());
    e->Start();
    return e;
  }
  int64_t AuxBytes() const {
    return dynamic_cast<engine::cpu::CpuBackend&>(*backend_).LazyAuxBytes();
  }
  static std::vector<int32_t> Prompt(int32_t n, int32_t salt) {
    std::vector<int32_t> p;
    for (int32_t i = 0; i < n; ++i) p.push_back(static_cast<int32_t>((i * 29 + salt * 7) % 250));
    return p;
  }
  static engine::Request Revive(std::vector<int32_t> prompt, int32_t new_tokens,
                                std::vector<float> keep, bool revive = true) {
    engine::Request r = testing::GreedyRequest(std::move(prompt), new_tokens);
    r.lazy.mode = LazyOptions::Mode::kOn;
    r.lazy.boundaries = {0, 2};
    r.lazy.keep = std::move(keep);
    r.lazy.revive = revive;
    r.lazy.revive_set = true;
    return r;
  }
  static engine::KvSlot Slot(int32_t i) { return {i / 16, i % 16}; }
  // K and V of own slot `slot` in layer l, as stored (float32 KV).
  std::vector<float> SlotKv(engine::Backend& b, int32_t slot, int32_t l) const {
    const engine::ModelConfig& c = model_->config;
    const int32_t bs = 16, kvh = c.num_kv_heads, D = c.head_dim, L = c.num_layers;
    auto bytes = b.KvBlockBytes(slot / bs);
    EXPECT_TRUE(bytes.ok());
    std::vector<float> all(bytes->size() / sizeof(float));
    std::memcpy(all.data(), bytes->data(), bytes->size());
    const size_t per_block = static_cast<size_t>(bs) * kvh * D;
    const int32_t t = slot % bs;
    std::vector<float> out;
    for (int32_t h = 0; h < kvh; ++h) {  // K: [layer][kv_head][d][slot]
      for (int32_t d = 0; d < D; ++d) out.push_back(all[l * per_block + (h * D + d) * bs + t]);
    }
    const size_t v0 = L * per_block + l * per_block;  // V: [layer][slot][kv_head][d]
    for (int32_t e = 0; e < kvh * D; ++e) out.push_back(all[v0 + t * kvh * D + e]);
    return out;
  }

  std::unique_ptr<engine::ModelBundle> model_;
  std::unique_ptr<engine::Backend> backend_;
};

// One boundary (after layer 1): a prefill keeps 40%, then one decode step selects 90%
// of stage 0 and revives what stage 1 lacks. Each revived token's stage-1 K/V equals,
// bit for bit, that of a replayed prefill whose decision had also kept that one token.
TEST_F(LazyRevivalTest, RevivedKvIsWhatAPrefillThatKeptItHolds) {
  const int32_t n = 40;
  const std::vector<int32_t> prompt = Prompt(n, 3);
  auto a = MakeBackend(8);
  BatchPlan pre;
  pre.tokens = prompt;
  engine::SeqPlan s;
  s.id = 7;
  s.num_tokens = n;
  s.lazy.boundaries = {1};
  s.lazy.keep = {0.4f};
  s.lazy.revive = {0.9f};
  s.lazy.stage_context.resize(1);
  s.lazy.stage_slots.resize(1);
  for (int32_t i = 0; i < n; ++i) {
    pre.positions.push_back(static_cast<float>(i));
    pre.kv_slots.push_back(Slot(i));
    s.lazy.stage_slots[0].push_back(Slot(i));
  }
  pre.seqs.push_back(s);
  pre.logits_for = {n - 1};
  ForwardOutput pout;
  ASSERT_TRUE(a->Forward(pre, &pout).ok());
  const std::vector<int32_t> depth = pout.lazy.at(0).depth;
  EXPECT_GT(dynamic_cast<engine::cpu::CpuBackend&>(*a).LazyAuxBytes(), 0);

  BatchPlan dec;
  engine::SeqPlan d;
  d.id = 7;
  d.num_tokens = 1;
  d.context = {{0, 0, 16}, {1, 0, 16}, {2, 0, 8}};
  d.lazy.boundaries = {1};
  d.lazy.revive = {0.9f};
  d.lazy.entries.resize(1);
  for (int32_t i = 0; i < n; ++i) {
    if (depth[i] > 1)
      d.lazy.entries[0].push_back({i, static_cast<int32_t>(d.lazy.entries[0].size())});
  }
  const int32_t kept = static_cast<int32_t>(d.lazy.entries[0].size());
  d.lazy.prefill_entries = {kept};
  d.lazy.blocks = {0, 1, 2, 3};
  d.lazy.own_begin = n;
  d.lazy.recorded = n;
  dec.seqs.push_back(d);
  dec.tokens = {77};
  dec.positions = {static_cast<float>(n)};
  dec.kv_slots = {Slot(n)};
  dec.logits_for = {0};
  ForwardOutput dout;
  ASSERT_TRUE(a->Forward(dec, &dout).ok());
  ASSERT_EQ(dout.lazy.size(), 1u);
  const std::vector<engine::LazyEntry>& revived = dout.lazy[0].revived.at(0);
  ASSERT_FALSE(revived.empty()) << "90% of stage 0 should include tokens stage 1 lacks";
  // Each revived token computed once in each stage-1 layer, with the decode token.
  const int32_t R = static_cast<int32_t>(revived.size());
  EXPECT_EQ(dout.lazy[0].layer_tokens, (std::vector<int32_t>{1, 1, 1 + R, 1 + R}));
  for (int32_t i = 1; i < R; ++i) EXPECT_LT(revived[i - 1].own, revived[i].own);

  for (int32_t idx : {0, R - 1}) {
    const int32_t own = revived[idx].own;
    ASSERT_EQ(depth[own], 1);
    // Its prefix: the prefill's stage-1 tokens before it.
    int32_t before = 0;
    for (int32_t i = 0; i < own; ++i) before += depth[i] > 1;
    EXPECT_EQ(revived[idx].prefix, before);
    // The reference: replay the prefill with this one token kept too.
    auto b = MakeBackend(8);
    BatchPlan rep = pre;
    rep.seqs[0].lazy.keep.clear();
    rep.seqs[0].lazy.revive.clear();
    rep.seqs[0].lazy.depth = depth;
    rep.seqs[0].lazy.depth[own] = 2;
    rep.seqs[0].lazy.stage_slots[0].resize(kept + 1);
    rep.logits_for.clear();
    ForwardOutput rout;
    ASSERT_TRUE(b->Forward(rep, &rout).ok());
    for (int32_t l = 2; l < 4; ++l) {  // stage 1's layers
      EXPECT_EQ(SlotKv(*a, kept + idx, l), SlotKv(*b, before, l))
          << "own " << own << " layer " << l;
    }
  }
  a->ReleaseSequence(7);
  EXPECT_EQ(dynamic_cast<engine::cpu::CpuBackend&>(*a).LazyAuxBytes(), 0);
}

// keep 1.0: every token is in every stage, nothing to revive: the baseline.
TEST_F(LazyRevivalTest, KeepOneRevivesNothingAndIsTheBaseline) {
  auto eng = Start(64);
  const std::vector<int32_t> p = Prompt(40, 1);
  const testing::Completion base = testing::RunRequest(*eng, testing::GreedyRequest(p, 16));
  const testing::Completion lazy = testing::RunRequest(*eng, Revive(p, 16, {1.0f, 1.0f}));
  ASSERT_TRUE(base.status.ok() && lazy.status.ok());
  EXPECT_EQ(lazy.tokens, base.tokens);
  EXPECT_TRUE(lazy.usage.lazy_revive);
  EXPECT_EQ(lazy.usage.lazy_revived_tokens, 0);
  EXPECT_EQ(AuxBytes(), 0);
}

// With pruning, decode steps revive tokens: counted in usage (stage tokens grow past
// the prefill's), and the Aux Cache is freed when the request finishes.
TEST_F(LazyRevivalTest, DecodeRevivesAndFreesTheAuxCache) {
  auto eng = Start(64);
  const std::vector<int32_t> p = Prompt(48, 2);
  const testing::Completion ttft = testing::RunRequest(*eng, Revive(p, 20, {0.5f, 0.5f}, false));
  const testing::Completion rev = testing::RunRequest(*eng, Revive(p, 20, {0.5f, 0.5f}));
  ASSERT_TRUE(ttft.status.ok() && rev.status.ok());
  EXPECT_FALSE(ttft.usage.lazy_revive);
  EXPECT_GT(rev.usage.lazy_revived_tokens, 0);
  ASSERT_EQ(rev.usage.lazy_stage_tokens.size(), 3u);
  int64_t grown = 0;
  for (size_t s = 0; s < 3; ++s) {
    EXPECT_GE(rev.usage.lazy_stage_tokens[s], ttft.usage.lazy_stage_tokens[s]);
    EXPECT_LE(rev.usage.lazy_stage_tokens[s], 48);
    grown += rev.usage.lazy_stage_tokens[s] - ttft.usage.lazy_stage_tokens[s];
  }
  EXPECT_EQ(grown, rev.usage.lazy_revived_tokens);
  EXPECT_EQ(AuxBytes(), 0);
  EXPECT_EQ(eng->blocks().free_blocks(), 64);
}

// Past the Aux Cache budget a sequence decodes without revival (the prefill still
// prunes); the budget comes back when it finishes.
TEST_F(LazyRevivalTest, AuxBudgetTurnsRevivalOff) {
  const std::vector<int32_t> p = Prompt(40, 7);
  const int64_t one = 40 * model_->config.hidden_size * int64_t{sizeof(float)};
  auto eng = Start(64, one);
  const std::vector<testing::Completion> both = testing::RunTogether(
      *eng, {Revive(p, 16, {0.5f, 0.5f}), Revive(Prompt(40, 8), 16, {0.5f, 0.5f})});
  const testing::Completion &ra = both[0], &rb = both[1];
  ASSERT_TRUE(ra.status.ok() && rb.status.ok());
  EXPECT_TRUE(ra.usage.lazy_revive);
  EXPECT_FALSE(rb.usage.lazy_revive);
  EXPECT_EQ(rb.usage.lazy_stage_tokens.size(), 3u);  // pruned all the same
  const testing::Completion again = testing::RunRequest(*eng, Revive(p, 16, {0.5f, 0.5f}));
  EXPECT_TRUE(again.usage.lazy_revive);
}

// A reviving prefill split over steps runs unpruned from then on; the share of the Aux
// Cache budget it holds stays with it (the engine gives it back when it finishes).
TEST(LazyRevivalStepsTest, ChunkedPrefillKeepsItsBudgetShare) {
  engine::Sequence seq;
  seq.prompt_len = 40;
  seq.tokens.assign(40, 5);
  seq.lazy.boundaries = {0, 2};
  seq.lazy.keep = {0.5f, 0.5f};
  seq.lazy.revive = true;
  seq.lazy.aux_reserved = 1234;
  engine::DropChunkedLazy(&seq, 16);
  EXPECT_FALSE(seq.lazy.active());
  EXPECT_FALSE(seq.lazy.revive);
  EXPECT_EQ(seq.lazy.aux_reserved, 1234);
  EXPECT_FALSE(seq.lazy.skipped.empty());
}

// A backend that prunes but does not revive: a request asking for revival gets
// UNIMPLEMENTED naming lazy.revive; a server default to revive is dropped for it.
TEST_F(LazyRevivalTest, BackendWithoutRevival) {
  struct NoRevival : testing::ForwardingBackend {
    using ForwardingBackend::ForwardingBackend;
    bool SupportsLazyRevival() const override { return false; }
  };
  auto inner = MakeBackend(64);
  NoRevival backend(inner.get());
  engine::EngineOptions eo;
  eo.lazy.min_prompt = 16;
  eo.lazy.default_schedule.revive = true;
  engine::Engine eng(eo, model_->config, model_->tokenizer.get(), &backend);
  eng.Start();
  const testing::Completion asked =
      testing::RunRequest(eng, Revive(Prompt(40, 1), 4, {0.5f, 0.5f}));
  EXPECT_EQ(asked.status.code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(asked.status.message().find("lazy.revive"), std::string::npos) << asked.status;
  engine::Request r = Revive(Prompt(40, 1), 4, {0.5f, 0.5f});
  r.lazy.revive_set = false;  // the server default
  const testing::Completion dflt = testing::RunRequest(eng, std::move(r));
  ASSERT_TRUE(dflt.status.ok()) << dflt.status;
  EXPECT_FALSE(dflt.usage.lazy_revive);
  EXPECT_EQ(dflt.usage.lazy_stage_tokens.size(), 3u);
}

// Revival keeps a sequence's results independent of its batch.
TEST_F(LazyRevivalTest, BatchedEqualsAlone) {
  const std::vector<int32_t> a = Prompt(40, 4), b = Prompt(44, 5);
  std::vector<testing::Completion> alone;
  {
    auto eng = Start(64);
    alone.push_back(testing::RunRequest(*eng, Revive(a, 16, {0.5f, 0.6f})));
    alone.push_back(testing::RunRequest(*eng, Revive(b, 16, {0.5f, 0.6f})));
  }
  auto eng = Start(64);
  const std::vector<testing::Completion> both =
      testing::RunTogether(*eng, {Revive(a, 16, {0.5f, 0.6f}), Revive(b, 16, {0.5f, 0.6f})});
  const testing::Completion &ra = both[0], &rb = both[1];
  ASSERT_TRUE(ra.status.ok() && rb.status.ok());
  ASSERT_GT(alone[0].usage.lazy_revived_tokens, 0);
  EXPECT_EQ(ra.tokens, alone[0].tokens);
  EXPECT_EQ(rb.tokens, alone[1].tokens);
  EXPECT_EQ(ra.usage.lazy_revived_tokens, alone[0].usage.lazy_revived_tokens);
  EXPECT_EQ(rb.usage.lazy_revived_tokens, alone[1].usage.lazy_revived_tokens);
}

// Two revival requests that do not fit the pool together: the preempted one replays
// its decision and its revivals (one step for the recorded tokens) and produces what it
// produces alone; no KV block or Aux Cache is left behind.
TEST_F(LazyRevivalTest, PreemptionReplaysTheRevivals) {
  const std::vector<int32_t> a = Prompt(40, 5), b = Prompt(40, 6);
  std::vector<testing::Completion> alone;
  {
    auto eng = Start(64);
    alone.push_back(testing::RunRequest(*eng, Revive(a, 40, {0.5f, 0.5f})));
    alone.push_back(testing::RunRequest(*eng, Revive(b, 40, {0.5f, 0.5f})));
  }
  ASSERT_GT(alone[0].usage.lazy_revived_tokens, 0);
  ASSERT_GT(alone[1].usage.lazy_revived_tokens, 0);
  auto eng = Start(8);  // 128 slots: the two need 160
  const std::vector<testing::Completion> both =
      testing::RunTogether(*eng, {Revive(a, 40, {0.5f, 0.5f}), Revive(b, 40, {0.5f, 0.5f})});
  const testing::Completion &ra = both[0], &rb = both[1];
  EXPECT_GT(eng->stats().preemptions, 0);
  ASSERT_TRUE(ra.status.ok() && rb.status.ok());
  EXPECT_EQ(ra.tokens, alone[0].tokens);
  EXPECT_EQ(rb.tokens, alone[1].tokens);
  EXPECT_EQ(ra.usage.lazy_revived_tokens, alone[0].usage.lazy_revived_tokens);
  EXPECT_EQ(rb.usage.lazy_stage_tokens, alone[1].usage.lazy_stage_tokens);
  EXPECT_EQ(eng->blocks().free_blocks(), 8);
  EXPECT_EQ(AuxBytes(), 0);
}

// Tensor parallelism: every rank revives alike (one all-reduced score row), and the
// group frees each rank's Aux Cache.
TEST_F(LazyRevivalTest, TensorParallelGroupRevives) {
  engine::BackendOptions o;
  o.kv_num_blocks = 64;
  o.tensor_parallel = 2;
  backend_ = engine::cpu::MakeCpuBackend(o);
  ASSERT_TRUE(backend_->Load(model_->config, *model_->weights, engine::Shard{}).ok());
  engine::EngineOptions eo;
  eo.lazy.min_prompt = 16;
  engine::Engine eng(eo, model_->config, model_->tokenizer.get(), backend_.get());
  eng.Start();
  const testing::Completion r = testing::RunRequest(eng, Revive(Prompt(48, 2), 20, {0.5f, 0.5f}));
  ASSERT_TRUE(r.status.ok()) << r.status;
  EXPECT_GT(r.usage.lazy_revived_tokens, 0);
  EXPECT_EQ(eng.blocks().free_blocks(), 64);
}

}  // namespace
}  // namespace superpose
