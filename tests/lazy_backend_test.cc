// LazyLLM on the CPU backend (engine/cpu/lazy_forward.cc) against the dense reference
// (tests/lazy_reference.h): keep 1.0 is the baseline bit for bit, a pruned forward is
// the dense forward of the kept tokens at each stage, every layer computes its stage's
// tokens once and no other (counted, and seen in the KV pool), decisions and logits do
// not depend on the batch, decode and recomputation see each stage's own KV, and
// tensor-parallel ranks decide alike.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "engine/lazy.h"
#include "engine/runtime/model_bundle.h"
#include "tests/lazy_plan.h"
#include "tests/lazy_reference.h"

namespace superpose {
namespace {

using engine::BatchPlan;
using engine::ForwardOutput;

class LazyBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = engine::LoadModelBundle("");  // built-in: 4 layers, GQA 4/2 heads
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::make_unique<engine::ModelBundle>(std::move(*m));
    backend_ = Make(1);
  }
  std::unique_ptr<engine::Backend> Make(int tp) const {
    engine::BackendOptions o;
    o.kv_num_blocks = 64;
    o.tensor_parallel = tp;
    auto b = engine::cpu::MakeCpuBackend(o);
    EXPECT_TRUE(b->Load(model_->config, *model_->weights, engine::Shard{}).ok());
    return b;
  }
  static std::vector<int32_t> Prompt(int32_t n, int32_t salt) {
    std::vector<int32_t> p;
    for (int32_t i = 0; i < n; ++i) p.push_back(static_cast<int32_t>((i * 37 + salt * 11) % 250));
    return p;
  }
  static void AddSeq(const std::vector<int32_t>& prompt, int32_t block0, engine::LazyPlan lazy,
                     BatchPlan* plan) {
    testing::AddLazyPrefill(prompt, block0, std::move(lazy), plan);
  }
  static engine::LazyPlan Lazy(std::vector<int32_t> b, std::vector<float> keep) {
    return testing::LazySchedule(std::move(b), std::move(keep));
  }
  std::vector<float> Row(const ForwardOutput& out, int r) const {
    const int32_t V = model_->config.vocab_size;
    return std::vector<float>(out.logits.begin() + r * V, out.logits.begin() + (r + 1) * V);
  }
  void ExpectNearRef(const std::vector<float>& got, const std::vector<double>& want) const {
    ASSERT_EQ(got.size(), want.size());
    double mx = 0;
    for (double v : want) mx = std::max(mx, std::abs(v));
    for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], want[i], 2e-4 * mx) << i;
  }

  std::unique_ptr<engine::ModelBundle> model_;
  std::unique_ptr<engine::Backend> backend_;
};

TEST_F(LazyBackendTest, KeepOneIsTheBaselineBitForBit) {
  const std::vector<int32_t> p = Prompt(45, 1);
  BatchPlan base, lazy;
  AddSeq(p, 0, {}, &base);
  AddSeq(p, 8, Lazy({0, 1, 2}, {1.0f, 1.0f, 1.0f}), &lazy);
  ForwardOutput a, b;
  ASSERT_TRUE(backend_->Forward(base, &a).ok());
  ASSERT_TRUE(backend_->Forward(lazy, &b).ok());
  EXPECT_EQ(a.logits, b.logits);
  ASSERT_EQ(b.lazy.size(), 1u);
  EXPECT_EQ(b.lazy[0].depth, std::vector<int32_t>(45, 4));
  EXPECT_EQ(b.lazy[0].layer_tokens, std::vector<int32_t>(4, 45));
}

TEST_F(LazyBackendTest, PrunedForwardIsTheDenseForwardOfTheKeptTokens) {
  const testing::LazyReference ref(model_->config, *model_->weights);
  for (auto [b, keep] :
       {std::pair<std::vector<int32_t>, std::vector<float>>{{0, 1, 2}, {0.7f, 0.7f, 0.7f}},
        {{1}, {0.3f}},
        {{0, 2}, {0.5f, 0.9f}}}) {
    const std::vector<int32_t> p = Prompt(60, static_cast<int32_t>(b.size()));
    BatchPlan plan;
    AddSeq(p, 0, Lazy(b, keep), &plan);
    ForwardOutput out;
    ASSERT_TRUE(backend_->Forward(plan, &out).ok());
    const auto want = ref.Run(p, b, keep);
    ASSERT_EQ(out.lazy.size(), 1u);
    EXPECT_EQ(out.lazy[0].depth, want.depth);
    EXPECT_EQ(out.lazy[0].layer_tokens, want.layer_tokens);
    ExpectNearRef(Row(out, 0), want.logits);
    // Stage sizes: the last token plus round(keep * candidates) of the previous stage.
    int32_t n = 60;
    for (size_t s = 0; s < b.size(); ++s) {
      n = 1 + engine::LazyKeepCount(keep[s], n - 1);
      EXPECT_EQ(out.lazy[0].layer_tokens.back() <= n, true);
    }
    EXPECT_EQ(out.lazy[0].layer_tokens.back(), n);
    // The replayed decision (recomputation) is the same dense forward.
    const auto replay = ref.Run(p, b, keep, want.depth);
    EXPECT_EQ(replay.depth, want.depth);
    for (size_t i = 0; i < replay.logits.size(); ++i) EXPECT_EQ(replay.logits[i], want.logits[i]);
  }
}

// Each layer writes the K/V of its stage's tokens and of no other, compact: a stage of
// n tokens fills own slots [0, n) of its layers and the rest stay zero (a fresh pool is
// zero).
TEST_F(LazyBackendTest, EachLayerComputesItsStageOnce) {
  const std::vector<int32_t> p = Prompt(32, 3);
  const std::vector<int32_t> bounds = {0, 2};
  BatchPlan plan;
  AddSeq(p, 0, Lazy(bounds, {0.5f, 0.5f}), &plan);
  ForwardOutput out;
  ASSERT_TRUE(backend_->Forward(plan, &out).ok());
  const auto& z = out.lazy.at(0);
  const engine::ModelConfig& c = model_->config;
  const int32_t bs = 16, D = c.head_dim, Hk = c.num_kv_heads;
  const size_t per_block = static_cast<size_t>(bs) * Hk * D;
  for (int32_t l = 0; l < c.num_layers; ++l) {
    const int32_t stage = engine::LazyStageOf(bounds, l);
    int32_t expect = 0;
    for (int32_t d : z.depth) expect += d > stage;
    EXPECT_EQ(z.layer_tokens[l], expect) << "layer " << l;
  }
  for (int32_t blk = 0; blk < 2; ++blk) {
    const auto bytes = backend_->KvBlockBytes(blk);
    ASSERT_TRUE(bytes.ok());
    const float* f = reinterpret_cast<const float*>(bytes->data());
    for (int32_t s = 0; s < bs; ++s) {
      const int32_t tok = blk * bs + s;
      for (int32_t l = 0; l < c.num_layers; ++l) {
        bool written = false;
        for (int32_t d = 0; d < D; ++d) {
          written |= f[l * per_block + static_cast<size_t>(d) * bs + s] != 0.0f;  // K, head 0
          written |=
              f[(c.num_layers + l) * per_block + static_cast<size_t>(s) * Hk * D + d] != 0.0f;
        }
        EXPECT_EQ(written, tok < z.layer_tokens[l]) << "slot " << tok << " layer " << l;
      }
    }
  }
}

TEST_F(LazyBackendTest, BatchInvariant) {
  const std::vector<int32_t> a = Prompt(50, 5), b = Prompt(21, 6), c = Prompt(33, 7);
  BatchPlan alone, batch;
  AddSeq(a, 0, Lazy({0, 2}, {0.6f, 0.7f}), &alone);
  AddSeq(b, 10, {}, &batch);
  AddSeq(a, 0, Lazy({0, 2}, {0.6f, 0.7f}), &batch);
  AddSeq(c, 20, Lazy({1}, {0.4f}), &batch);
  ForwardOutput x, y;
  ASSERT_TRUE(backend_->Forward(alone, &x).ok());
  ASSERT_TRUE(backend_->Forward(batch, &y).ok());
  ASSERT_EQ(y.lazy.size(), 2u);
  EXPECT_EQ(y.lazy[0].seq, 1);
  EXPECT_EQ(y.lazy[0].depth, x.lazy[0].depth);
  EXPECT_EQ(y.lazy[0].layer_tokens, x.lazy[0].layer_tokens);
  EXPECT_EQ(Row(y, 1), Row(x, 0));
  // The plain sequence is unaffected by its lazy neighbours.
  BatchPlan plain;
  AddSeq(b, 10, {}, &plain);
  ForwardOutput w;
  ASSERT_TRUE(backend_->Forward(plain, &w).ok());
  EXPECT_EQ(Row(y, 0), Row(w, 0));
}

// A decode step after a pruned prefill sees, at each layer, the K/V of that layer's
// stage (LazyPlan::stage_context): the dense forward of prompt + token with the
// prompt's depths and the new token in every stage.
TEST_F(LazyBackendTest, DecodeSeesEachStagesKv) {
  const testing::LazyReference ref(model_->config, *model_->weights);
  std::vector<int32_t> p = Prompt(40, 8);
  const std::vector<int32_t> bounds = {0, 1, 2};
  const std::vector<float> keep = {0.7f, 0.7f, 0.7f};
  BatchPlan plan;
  AddSeq(p, 0, Lazy(bounds, keep), &plan);
  ForwardOutput out;
  ASSERT_TRUE(backend_->Forward(plan, &out).ok());
  const std::vector<int32_t> depth = out.lazy.at(0).depth;
  // Stage st holds its prompt tokens at own slots [0, n); the new token goes to n.
  const BatchPlan step = testing::LazyDecodeStep(bounds, depth, 77);
  ForwardOutput dec;
  ASSERT_TRUE(backend_->Forward(step, &dec).ok());
  EXPECT_TRUE(dec.lazy.empty());
  std::vector<int32_t> all = p, all_depth = depth;
  all.push_back(77);
  all_depth.push_back(4);
  ExpectNearRef(Row(dec, 0), ref.Run(all, bounds, keep, all_depth).logits);
}

// A deciding prefill after a cached prefix (its context): the prefix is in every stage
// and never a candidate; the kept new tokens go compact after it.
TEST_F(LazyBackendTest, ContextIsInEveryStageAndNeverPruned) {
  const testing::LazyReference ref(model_->config, *model_->weights);
  const std::vector<int32_t> all = Prompt(60, 12), bounds = {0, 2};
  const std::vector<float> keep = {0.5f, 0.6f};
  const std::vector<int32_t> prefix(all.begin(), all.begin() + 32),
      rest(all.begin() + 32, all.end());
  BatchPlan first;
  AddSeq(prefix, 0, {}, &first);
  ForwardOutput unused;
  ASSERT_TRUE(backend_->Forward(first, &unused).ok());
  BatchPlan plan;
  engine::LazyPlan z = Lazy(bounds, keep);
  AddSeq(rest, 2, std::move(z), &plan);
  engine::SeqPlan& s = plan.seqs[0];
  s.context = {{0, 0, 16}, {1, 0, 16}};
  for (size_t i = 0; i < rest.size(); ++i) plan.positions[i] = 32.0f + static_cast<float>(i);
  for (size_t st = 0; st < bounds.size(); ++st) s.lazy.stage_context[st] = s.context;
  ForwardOutput out;
  ASSERT_TRUE(backend_->Forward(plan, &out).ok());
  const auto want = ref.Run(all, bounds, keep, {}, /*fixed=*/32);
  ASSERT_EQ(out.lazy.size(), 1u);
  EXPECT_EQ(out.lazy[0].depth, std::vector<int32_t>(want.depth.begin() + 32, want.depth.end()));
  for (int32_t i = 0; i < 32; ++i) EXPECT_EQ(want.depth[i], 3);
  ExpectNearRef(Row(out, 0), want.logits);
}

// Recomputation (after preemption) replays the decision: the same logits and K/V.
TEST_F(LazyBackendTest, ReplayedDepthsReproduceThePrefill) {
  const std::vector<int32_t> p = Prompt(48, 9);
  BatchPlan plan;
  AddSeq(p, 0, Lazy({0, 2}, {0.5f, 0.7f}), &plan);
  ForwardOutput out;
  ASSERT_TRUE(backend_->Forward(plan, &out).ok());
  auto again = Make(1);
  BatchPlan replay;
  engine::LazyPlan z = Lazy({0, 2}, {});
  z.depth = out.lazy.at(0).depth;
  AddSeq(p, 0, z, &replay);
  ForwardOutput r;
  ASSERT_TRUE(again->Forward(replay, &r).ok());
  EXPECT_EQ(r.logits, out.logits);
  EXPECT_EQ(r.lazy.at(0).depth, out.lazy[0].depth);
  EXPECT_EQ(r.lazy[0].layer_tokens, out.lazy[0].layer_tokens);
  for (int32_t blk = 0; blk < 3; ++blk)
    EXPECT_EQ(*again->KvBlockBytes(blk), *backend_->KvBlockBytes(blk));
}

TEST_F(LazyBackendTest, TensorParallelRanksDecideAlike) {
  const std::vector<int32_t> p = Prompt(64, 10);
  BatchPlan plan;
  AddSeq(p, 0, Lazy({0, 1, 2}, {0.7f, 0.7f, 0.7f}), &plan);
  ForwardOutput one, two;
  ASSERT_TRUE(backend_->Forward(plan, &one).ok());
  auto tp = Make(2);
  ASSERT_TRUE(tp->Forward(plan, &two).ok());
  ASSERT_EQ(two.lazy.size(), 1u);
  EXPECT_EQ(two.lazy[0].depth, one.lazy.at(0).depth);
  const std::vector<float> a = Row(one, 0), b = Row(two, 0);
  float mx = 0;
  for (float v : a) mx = std::max(mx, std::abs(v));
  for (size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(a[i], b[i], 1e-5f * mx);
}

TEST_F(LazyBackendTest, RefusesBadLazyPlans) {
  const std::vector<int32_t> p = Prompt(20, 11);
  auto expect_bad = [&](engine::LazyPlan z) {
    BatchPlan plan;
    AddSeq(p, 0, std::move(z), &plan);
    ForwardOutput out;
    const absl::Status st = backend_->Forward(plan, &out);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  };
  expect_bad(Lazy({2, 1}, {0.5f, 0.5f}));  // not increasing
  expect_bad(Lazy({4}, {0.5f}));           // past the last layer
  expect_bad(Lazy({1}, {0.0f}));           // keep out of (0, 1]
  expect_bad(Lazy({1, 2}, {0.5f}));        // one fraction per boundary
  engine::LazyPlan z = Lazy({1}, {});
  z.depth.assign(19, 2);
  expect_bad(z);  // one depth per token
}

}  // namespace
}  // namespace superpose
