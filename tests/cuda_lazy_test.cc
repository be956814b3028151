// LazyLLM on the CUDA backend (cuda/cuda_lazy.cc, cuda/lazy_stage.h; the CPU backend's
// semantics, docs/architecture.md "LazyLLM").
//
// CudaLazyStageTest runs without a GPU (builds with the CUDA backend): each stage's
// rows, slots, keys, score items and gather rows follow the CPU's rules, and driven with
// the dense reference's scores they reproduce the CPU backend's decision and counts;
// revival plans are refused.
//
// CudaLazyTest needs a GPU (skips without one) and compares with the CPU backend given
// bf16-rounded weights and a bf16 KV cache (the GPU's): keep 1.0 is the unpruned step
// bit for bit (with and without a LoRA adapter); the GPU's decisions are the CPU's
// except at near-ties (rule below); with the CPU's decision replayed (LazyPlan::depth)
// the logits are within the CPU comparison's tolerance of cuda_lora_test (every logit
// within 5% of the row's largest |logit|, the mean within 1%); each layer computes its
// stage's tokens once (counts, and the KV pool); a decode step after a pruned prefill
// matches the CPU; a bad plan, or one asking for revival, is refused and the backend
// keeps serving.
//
// Near-tie rule: bf16 weights and KV move a score by about 1% (cuda_backend_test's
// golden comparison), so where the GPU and the CPU first keep different tokens (a
// boundary s where they part; the stages before it agree), every token that one keeps
// and the other drops must have a dense-reference score (tests/lazy_reference.h, the
// CPU's decision in float64) within kTieRel = 5% of the cut, the lowest score the CPU
// kept; later boundaries are not compared (their candidates differ).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "engine/backend.h"
#include "engine/lazy.h"
#include "engine/runtime/model_bundle.h"

#if SUPERPOSE_HAVE_CUDA
#include "cuda/cuda_backend.h"
#include "cuda/cuda_errors.h"
#include "cuda/lazy_stage.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/cpu/cpu_options.h"
#include "engine/lora_adapter.h"
#include "engine/model/weights.h"
#include "engine/runtime/engine.h"
#include "tests/lazy_plan.h"
#include "tests/lazy_reference.h"
#include "tests/rounded_weights.h"
#include "tests/test_util.h"
#endif

namespace superpose {
namespace {

#if SUPERPOSE_HAVE_CUDA

using engine::BatchPlan;
using engine::ForwardOutput;

constexpr int32_t kBs = 16;
constexpr double kTieRel = 0.05;

std::vector<int32_t> Prompt(int32_t n, int32_t salt, int32_t vocab) {
  std::vector<int32_t> p;
  for (int32_t i = 0; i < n; ++i) p.push_back((i * 37 + salt * 11) % std::min(vocab, 250) + 3);
  return p;
}
using testing::AddLazyPrefill;
engine::LazyPlan Lazy(std::vector<int32_t> b, std::vector<float> keep,
                      std::vector<int32_t> depth = {}) {
  return testing::LazySchedule(std::move(b), std::move(keep), std::move(depth));
}
void AddSeq(const std::vector<int32_t>& prompt, int32_t block0, engine::LazyPlan lazy,
            BatchPlan* plan, int64_t adapter = 0) {
  AddLazyPrefill(prompt, block0, std::move(lazy), plan, adapter);
}

// ---- Host side (no GPU). ----

TEST(CudaLazyStageTest, FirstStageIsTheUnprunedStepMeta) {
  BatchPlan plan;
  AddSeq(Prompt(20, 1, 256), 0, Lazy({1, 2}, {0.5f, 0.5f}), &plan);
  AddSeq(Prompt(5, 2, 256), 4, {}, &plan);
  const cuda::LazyRows rows = cuda::AllLazyRows(plan);
  auto st = cuda::BuildStageMeta(plan, rows, {}, {}, kBs, 8);
  ASSERT_TRUE(st.ok()) << st.status();
  auto base = cuda::BuildStepMeta(plan, kBs, 8);
  ASSERT_TRUE(base.ok());
  ASSERT_GE(st->sm.words.size(), base->words.size());
  EXPECT_TRUE(std::equal(base->words.begin(), base->words.end(), st->sm.words.begin()));
  EXPECT_EQ(st->sm.rows, base->rows);
  // One score item: the lazy sequence's last row over its 20 keys, at layer 1.
  ASSERT_EQ(st->items.size(), 1u);
  EXPECT_EQ(st->items[0].row, 19);
  EXPECT_EQ(st->items[0].key_off, 0);
  EXPECT_EQ(st->items[0].nk, 20);
  EXPECT_EQ(st->item_layer[0], 1);
  EXPECT_EQ(st->score_floats, 20);
}

TEST(CudaLazyStageTest, PruneKeepsTheBestCompactlyAndRebuildsTheKeys) {
  BatchPlan plan;
  AddSeq(Prompt(3, 5, 256), 6, {}, &plan);  // a plain sequence first: rows 0..2
  AddSeq(Prompt(10, 1, 256), 0, Lazy({1}, {0.45f}), &plan);
  plan.seqs[1].context = {};
  cuda::LazyRows rows = cuda::AllLazyRows(plan);
  std::vector<int32_t> result_of;
  ForwardOutput out;
  cuda::StartLazyOutput(plan, &result_of, &out);
  ASSERT_EQ(out.lazy.size(), 1u);
  EXPECT_EQ(out.lazy[0].seq, 1);
  // Scores of the 10 rows (the last is the query); candidates 9, keep round(4.05) = 4
  // (ties: lower position): rows 7, 2, 5 and 0 (0.3 beats row 8's 0.3 on position).
  std::vector<std::vector<float>> scores(2);
  scores[1] = {0.3f, 0.1f, 0.5f, 0.0f, 0.05f, 0.4f, 0.1f, 0.9f, 0.3f, 0.2f};
  std::vector<int32_t> gather;
  cuda::CountLazyRows(rows, 1, result_of, &out);
  cuda::LazyPruneRows(plan, 1, scores, result_of, &rows, &gather, &out);
  const std::vector<int32_t> kept = {0, 2, 5, 7, 9};
  ASSERT_EQ(rows.count, (std::vector<int32_t>{3, 5}));
  EXPECT_EQ(rows.stage, (std::vector<int32_t>{0, 1}));
  std::vector<int32_t> want_gather = {0, 1, 2};
  for (int32_t k : kept) want_gather.push_back(3 + k);
  EXPECT_EQ(gather, want_gather);
  for (size_t k = 0; k < kept.size(); ++k) {
    EXPECT_EQ(rows.token[3 + k], 3 + kept[k]);
    EXPECT_EQ(rows.slot[3 + k].slot, static_cast<int32_t>(k));  // compact: own slot k
    EXPECT_EQ(rows.slot[3 + k].block, 0);
  }
  for (int32_t j = 0; j < 10; ++j) {
    const bool k = std::find(kept.begin(), kept.end(), j) != kept.end();
    EXPECT_EQ(out.lazy[0].depth[j], k ? 2 : 1) << j;
  }
  // The next stage's plan: original positions, stage slots, the logits row moved.
  auto st = cuda::BuildStageMeta(plan, rows, {}, gather, kBs, 8);
  ASSERT_TRUE(st.ok());
  const BatchPlan sp = cuda::StagePlan(plan, rows);
  EXPECT_EQ(sp.positions[3 + 2], 5.0f);
  EXPECT_EQ(sp.logits_for, (std::vector<int32_t>{2, 7}));
  EXPECT_EQ(st->sm.rows, (std::vector<int32_t>{2, 7}));
  const int32_t* keys = st->sm.words.data() + st->sm.off_keys;
  EXPECT_EQ(keys[3], 0 * kBs + 0);  // the lazy sequence's keys: its own slots 0..4
  EXPECT_EQ(keys[7], 4);
  EXPECT_TRUE(st->items.empty());  // no boundary left
  EXPECT_TRUE(std::equal(gather.begin(), gather.end(), st->sm.words.begin() + st->off_gather));
}

TEST(CudaLazyStageTest, DecodeStepKeepsItsRowAndSwitchesKeys) {
  BatchPlan plan;
  engine::SeqPlan s;
  s.num_tokens = 1;
  s.context = {{0, 0, 16}, {1, 0, 4}};
  s.lazy.boundaries = {0};
  s.lazy.stage_context = {{{0, 0, 9}}};
  s.lazy.stage_slots = {{{0, 9}}};
  plan.seqs.push_back(s);
  plan.tokens = {7};
  plan.positions = {20.0f};
  plan.kv_slots = {{1, 4}};
  plan.logits_for = {0};
  cuda::LazyRows rows = cuda::AllLazyRows(plan);
  std::vector<int32_t> result_of, gather;
  ForwardOutput out;
  cuda::StartLazyOutput(plan, &result_of, &out);
  EXPECT_TRUE(out.lazy.empty());  // a decode step reports nothing
  auto st0 = cuda::BuildStageMeta(plan, rows, {}, {}, kBs, 8);
  ASSERT_TRUE(st0.ok());
  EXPECT_EQ(st0->sm.off_tiles - st0->sm.off_keys, 21u);  // 20 context keys + itself
  EXPECT_TRUE(st0->items.empty());
  cuda::LazyPruneRows(plan, 0, {{}}, result_of, &rows, &gather, &out);
  ASSERT_EQ(rows.token, std::vector<int32_t>{0});
  EXPECT_EQ(rows.slot[0].slot, 9);
  auto st1 = cuda::BuildStageMeta(plan, rows, {}, gather, kBs, 8);
  ASSERT_TRUE(st1.ok());
  const std::vector<int32_t> keys(st1->sm.words.begin() + st1->sm.off_keys,
                                  st1->sm.words.begin() + st1->sm.off_tiles);
  EXPECT_EQ(keys, (std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}));
  EXPECT_EQ(st1->sm.words[st1->sm.off_slots], 9);
  EXPECT_EQ(st1->sm.words[st1->sm.off_pos], st0->sm.words[st0->sm.off_pos]);  // RoPE position
}

TEST(CudaLazyStageTest, RevivalIsRefusedNamingTheField) {
  BatchPlan plan;
  AddSeq(Prompt(8, 1, 256), 0, Lazy({1}, {0.5f}), &plan);
  EXPECT_TRUE(cuda::CheckNoRevival(plan).ok());
  plan.seqs[0].lazy.revive = {0.5f};
  const absl::Status st = cuda::CheckNoRevival(plan);
  EXPECT_EQ(st.code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(st.message().find("lazy.revive"), std::string::npos) << st;
  plan.seqs[0].lazy.revive.clear();
  plan.seqs[0].lazy.recorded = 8;
  EXPECT_EQ(cuda::CheckNoRevival(plan).code(), absl::StatusCode::kUnimplemented);
}

// The host side of the CUDA forward driven layer by layer with the dense reference's
// scores (what the score kernels compute, in float64) reproduces the CPU backend's
// decision and per-layer counts on the built-in model: the stage bookkeeping, candidate
// order and keep counts are the CPU's.
TEST(CudaLazyStageTest, HostStagesWithReferenceScoresReproduceTheCpu) {
  auto model = engine::LoadModelBundle("");
  ASSERT_TRUE(model.ok()) << model.status();
  engine::BackendOptions o;
  o.kv_num_blocks = 16;
  auto cpu = engine::cpu::MakeCpuBackend(o);
  ASSERT_TRUE(cpu->Load(model->config, *model->weights, engine::Shard{}).ok());
  const testing::LazyReference ref(model->config, *model->weights);
  for (auto [b, keep] :
       {std::pair<std::vector<int32_t>, std::vector<float>>{{0, 1, 2}, {0.7f, 0.7f, 0.7f}},
        {{1}, {0.3f}},
        {{0, 2}, {0.5f, 0.9f}}}) {
    const std::vector<int32_t> p = Prompt(60, static_cast<int32_t>(b.size()), 256);
    BatchPlan plan;
    AddSeq(p, 0, Lazy(b, keep), &plan);
    ForwardOutput want;
    ASSERT_TRUE(cpu->Forward(plan, &want).ok());
    const auto r = ref.Run(p, b, keep);
    cuda::LazyRows rows = cuda::AllLazyRows(plan);
    std::vector<int32_t> result_of, gather;
    ForwardOutput got;
    cuda::StartLazyOutput(plan, &result_of, &got);
    for (int32_t l = 0; l < model->config.num_layers; ++l) {
      cuda::CountLazyRows(rows, l, result_of, &got);
      if (!cuda::LazyAtBoundary(plan.seqs[0], rows.stage[0], l)) continue;
      std::vector<std::vector<float>> scores(1);
      for (int32_t j = 0; j < rows.count[0]; ++j) {
        scores[0].push_back(static_cast<float>(r.scores.at(rows.stage[0])[rows.token[j]]));
      }
      cuda::LazyPruneRows(plan, l, scores, result_of, &rows, &gather, &got);
      auto st = cuda::BuildStageMeta(plan, rows, {}, gather, kBs, 8);
      ASSERT_TRUE(st.ok()) << st.status();
    }
    ASSERT_EQ(got.lazy.size(), 1u);
    EXPECT_EQ(got.lazy[0].depth, want.lazy.at(0).depth);
    EXPECT_EQ(got.lazy[0].layer_tokens, want.lazy.at(0).layer_tokens);
  }
}

// ---- On the GPU. ----

using testing::RoundedWeights;

class CudaLazyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (!cuda::CudaAvailable(&why)) GTEST_SKIP() << "no usable CUDA device: " << why;
    Use("");
  }
  // The built-in model ("") or a model directory, on both backends.
  void Use(const std::string& dir) {
    auto m = engine::LoadModelBundle(dir);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::make_unique<engine::ModelBundle>(std::move(*m));
    rounded_ = RoundedWeights(*model_->weights);
    engine::BackendOptions o;
    o.kv_num_blocks = 64;
    auto gpu = cuda::MakeCudaBackend(o);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    gpu_ = *std::move(gpu);
    ASSERT_TRUE(gpu_->Load(model_->config, *model_->weights, engine::Shard{}).ok());
    engine::cpu::CpuOptions co;
    co.dtype = engine::cpu::WeightDType::kFloat32;
    co.kv_cache_dtype = engine::cpu::KvCacheDType::kBFloat16;
    cpu_ = engine::cpu::MakeCpuBackend(o, co);
    ASSERT_TRUE(cpu_->Load(model_->config, *rounded_, engine::Shard{}).ok());
  }
  ForwardOutput Run(engine::Backend& b, const BatchPlan& plan) {
    ForwardOutput out;
    absl::Status st = b.Forward(plan, &out);
    EXPECT_TRUE(st.ok()) << b.name() << ": " << st;
    return out;
  }
  std::vector<float> Row(const ForwardOutput& out, int r) const {
    const int32_t V = model_->config.vocab_size;
    return std::vector<float>(out.logits.begin() + r * V, out.logits.begin() + (r + 1) * V);
  }
  // Every logit within k * the row's largest |logit|, the mean within mean_k.
  void ExpectClose(const std::vector<float>& got, const std::vector<float>& want,
                   const std::string& what) const {
    ASSERT_EQ(got.size(), want.size()) << what;
    float mx = 0;
    for (float v : want) mx = std::max(mx, std::abs(v));
    double sum = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      const double d = std::abs(got[i] - want[i]);
      sum += d;
      ASSERT_LE(d, 0.05 * mx) << what << " id " << i;
    }
    EXPECT_LE(sum / got.size(), 0.01 * mx) << what << " mean difference";
  }
  // The near-tie rule (top of the file); returns the near-ties seen.
  int ExpectSameDecision(const std::vector<int32_t>& gpu, const std::vector<int32_t>& cpu,
                         const testing::LazyReference::Result& ref, size_t boundaries,
                         const std::string& what) const {
    const size_t n = cpu.size();
    EXPECT_EQ(gpu.size(), n) << what;
    if (gpu.size() != n) return 0;
    for (size_t s = 0; s < boundaries; ++s) {
      const int32_t on = static_cast<int32_t>(s) + 1;  // kept at boundary s: depth > on
      double cut = INFINITY;
      std::vector<size_t> diff;
      for (size_t t = 0; t + 1 < n; ++t) {
        if (cpu[t] > on) cut = std::min(cut, ref.scores.at(s)[t]);
        if ((gpu[t] > on) != (cpu[t] > on)) diff.push_back(t);
      }
      if (diff.empty()) continue;
      for (size_t t : diff) {
        EXPECT_LE(std::abs(ref.scores.at(s)[t] - cut), kTieRel * cut)
            << what << ": boundary " << s << " token " << t << " not a near-tie";
      }
      return static_cast<int>(diff.size());
    }
    return 0;
  }

  std::unique_ptr<engine::ModelBundle> model_;
  std::unique_ptr<engine::InMemoryWeights> rounded_;
  std::unique_ptr<engine::Backend> gpu_, cpu_;
};

TEST_F(CudaLazyTest, SupportsLazy) { EXPECT_TRUE(gpu_->SupportsLazy()); }

TEST_F(CudaLazyTest, KeepOneIsTheBaselineBitForBit) {
  const std::vector<int32_t> p = Prompt(40, 1, model_->config.vocab_size);
  BatchPlan plain;
  AddSeq(p, 0, {}, &plain);
  const ForwardOutput base = Run(*gpu_, plain);
  BatchPlan lazy;
  AddSeq(p, 0, Lazy({0, 1, 2}, {1.0f, 1.0f, 1.0f}), &lazy);
  const ForwardOutput got = Run(*gpu_, lazy);
  EXPECT_EQ(got.logits, base.logits);
  ASSERT_EQ(got.lazy.size(), 1u);
  EXPECT_EQ(got.lazy[0].depth, std::vector<int32_t>(40, 4));
  EXPECT_EQ(got.lazy[0].layer_tokens, std::vector<int32_t>(model_->config.num_layers, 40));
  // With a LoRA adapter: its segments rebuilt for the rows left, the same bits.
  const std::vector<int32_t> mods = {engine::kLoraQ, engine::kLoraV, engine::kLoraO,
                                     engine::kLoraDown};
  ASSERT_TRUE(gpu_->LoadAdapter(
                      3, engine::RandomLoraAdapter(model_->config, 8, 16.0f, mods, 5, 0.15f, false))
                  .ok());
  plain.seqs[0].adapter = 3;
  lazy.seqs[0].adapter = 3;
  const ForwardOutput base_a = Run(*gpu_, plain);
  EXPECT_NE(base_a.logits, base.logits);
  EXPECT_EQ(Run(*gpu_, lazy).logits, base_a.logits);
  EXPECT_TRUE(gpu_->UnloadAdapter(3).ok());
}

// Decisions on the built-in model and on stories260k, several prompts and schedules;
// then the CPU's decision replayed on the GPU gives the CPU's logits (tolerance) and
// the same per-layer counts.
TEST_F(CudaLazyTest, DecisionsAndLogitsMatchTheCpu) {
  const std::vector<std::pair<std::vector<int32_t>, std::vector<float>>> schedules = {
      {{0, 1, 2}, {0.7f, 0.7f, 0.7f}}, {{1}, {0.3f}}, {{0, 2}, {0.5f, 0.9f}}};
  int ties = 0, compared = 0;
  for (const std::string& dir :
       {std::string(""), std::string(SP_SHARED_DIR) + "/fixtures/stories260k"}) {
    Use(dir);
    const testing::LazyReference ref(model_->config, *rounded_);
    for (int32_t salt = 0; salt < 3; ++salt) {
      for (const auto& [b, keep] : schedules) {
        const std::string what = (dir.empty() ? "builtin" : "stories260k") + std::string(" salt ") +
                                 std::to_string(salt) + " b " + std::to_string(b.size());
        const std::vector<int32_t> p = Prompt(48 + 7 * salt, salt, model_->config.vocab_size);
        BatchPlan plan;
        AddSeq(p, 0, Lazy(b, keep), &plan);
        const ForwardOutput g = Run(*gpu_, plan), c = Run(*cpu_, plan);
        ASSERT_EQ(g.lazy.size(), 1u) << what;
        ASSERT_EQ(c.lazy.size(), 1u) << what;
        const auto want = ref.Run(p, b, keep);
        ties += ExpectSameDecision(g.lazy[0].depth, c.lazy[0].depth, want, b.size(), what);
        ++compared;
        if (g.lazy[0].depth == c.lazy[0].depth) ExpectClose(Row(g, 0), Row(c, 0), what);
        // The CPU's decision replayed on the GPU.
        BatchPlan replay;
        AddSeq(p, 0, Lazy(b, {}, c.lazy[0].depth), &replay);
        const ForwardOutput r = Run(*gpu_, replay);
        ASSERT_EQ(r.lazy.size(), 1u) << what;
        EXPECT_EQ(r.lazy[0].depth, c.lazy[0].depth) << what;
        EXPECT_EQ(r.lazy[0].layer_tokens, c.lazy[0].layer_tokens) << what;
        ExpectClose(Row(r, 0), Row(c, 0), what + " replay");
      }
    }
  }
  std::printf("decisions: %d near-tie tokens over %d pruned prefills\n", ties, compared);
}

// Each layer writes the K/V of its stage's tokens and of no other, compact: a stage of
// n tokens fills own slots [0, n) of its layers and the rest stay zero (the pool starts
// zeroed).
TEST_F(CudaLazyTest, EachLayerComputesItsStageOnce) {
  const std::vector<int32_t> bounds = {0, 2};
  BatchPlan plan;
  AddSeq(Prompt(32, 3, model_->config.vocab_size), 0, Lazy(bounds, {0.5f, 0.5f}), &plan);
  const ForwardOutput out = Run(*gpu_, plan);
  ASSERT_EQ(out.lazy.size(), 1u);
  const auto& z = out.lazy[0];
  const engine::ModelConfig& c = model_->config;
  const int32_t D = c.head_dim, Hk = c.num_kv_heads;
  for (int32_t l = 0; l < c.num_layers; ++l) {
    const int32_t stage = engine::LazyStageOf(bounds, l);
    int32_t expect = 0;
    for (int32_t d : z.depth) expect += d > stage;
    EXPECT_EQ(z.layer_tokens.at(l), expect) << "layer " << l;
  }
  // Stage sizes: the last token plus round(keep * candidates) of the previous stage.
  int32_t n = 32;
  for (size_t st = 0; st < bounds.size(); ++st) n = 1 + engine::LazyKeepCount(0.5f, n - 1);
  EXPECT_EQ(z.layer_tokens.back(), n);
  const size_t per_block = static_cast<size_t>(kBs) * Hk * D;  // bf16 elements
  for (int32_t blk = 0; blk < 2; ++blk) {
    const auto bytes = gpu_->KvBlockBytes(blk);
    ASSERT_TRUE(bytes.ok()) << bytes.status();
    const uint16_t* e = reinterpret_cast<const uint16_t*>(bytes->data());
    for (int32_t s = 0; s < kBs; ++s) {
      const int32_t tok = blk * kBs + s;
      for (int32_t l = 0; l < c.num_layers; ++l) {
        bool written = false;
        for (int32_t i = 0; i < Hk * D; ++i) {
          written |= e[l * per_block + static_cast<size_t>(s) * Hk * D + i] != 0;  // K
          written |= e[(c.num_layers + l) * per_block + static_cast<size_t>(s) * Hk * D + i] != 0;
        }
        EXPECT_EQ(written, tok < z.layer_tokens[l]) << "slot " << tok << " layer " << l;
      }
    }
  }
}

// A decode step after a pruned prefill (the CPU's decision, replayed on both) sees, at
// each layer, that layer's stage context: the CPU's logits within tolerance.
TEST_F(CudaLazyTest, DecodeAfterPrunedPrefillMatchesTheCpu) {
  const std::vector<int32_t> p = Prompt(40, 8, model_->config.vocab_size);
  const std::vector<int32_t> bounds = {0, 1, 2};
  BatchPlan plan;
  AddSeq(p, 0, Lazy(bounds, {0.7f, 0.7f, 0.7f}), &plan);
  const ForwardOutput c = Run(*cpu_, plan);
  ASSERT_EQ(c.lazy.size(), 1u);
  const std::vector<int32_t> depth = c.lazy[0].depth;
  BatchPlan replay;
  AddSeq(p, 0, Lazy(bounds, {}, depth), &replay);
  ExpectClose(Row(Run(*gpu_, replay), 0), Row(c, 0), "prefill");
  const BatchPlan step = testing::LazyDecodeStep(bounds, depth, 77);
  const ForwardOutput gd = Run(*gpu_, step), cd = Run(*cpu_, step);
  EXPECT_TRUE(gd.lazy.empty());
  ExpectClose(Row(gd, 0), Row(cd, 0), "decode");
}

TEST_F(CudaLazyTest, RefusesBadLazyPlansAndKeepsServing) {
  BatchPlan plan;
  AddSeq({256 % model_->config.vocab_size, 72, 101}, 0, {}, &plan);
  const ForwardOutput plain = Run(*gpu_, plan);
  plan.seqs[0].lazy.boundaries = {1};
  plan.seqs[0].lazy.stage_context.resize(1);
  plan.seqs[0].lazy.stage_slots = {plan.kv_slots};
  plan.seqs[0].lazy.keep = {1.5f};  // not in (0, 1]
  ForwardOutput out;
  EXPECT_EQ(gpu_->Forward(plan, &out).code(), absl::StatusCode::kInvalidArgument);
  plan.seqs[0].lazy.keep = {0.5f};
  plan.seqs[0].lazy.boundaries = {model_->config.num_layers};  // past the last layer
  EXPECT_EQ(gpu_->Forward(plan, &out).code(), absl::StatusCode::kInvalidArgument);
  plan.seqs[0].lazy.boundaries = {1};
  plan.seqs[0].lazy.revive = {0.5f};  // decode-time revival: not on this backend
  EXPECT_EQ(gpu_->Forward(plan, &out).code(), absl::StatusCode::kUnimplemented);
  EXPECT_FALSE(gpu_->SupportsLazyRevival());
  plan.seqs[0].lazy = {};
  EXPECT_EQ(Run(*gpu_, plan).logits, plain.logits);
  EXPECT_TRUE(gpu_->Health().ok());
}

// Through the engine on the GPU: a request asking for lazy and one that takes the
// engine's default schedule (--lazy_default) both prune (usage: the stage sizes of
// the rule, round(keep x candidates) plus the last token) and decode to the end.
TEST_F(CudaLazyTest, EngineRunsLazyRequestsAndTheDefault) {
  engine::EngineOptions eo;
  eo.lazy.min_prompt = 16;
  eo.lazy.default_schedule.mode = engine::LazyOptions::Mode::kOn;
  eo.lazy.default_schedule.boundaries = {0, 1, 2};
  eo.lazy.default_schedule.keep = {0.7f, 0.7f, 0.7f};
  engine::Engine eng(eo, model_->config, model_->tokenizer.get(), gpu_.get());
  eng.Start();
  std::vector<int32_t> stages = {40};
  for (int s = 0; s < 3; ++s) stages.push_back(1 + engine::LazyKeepCount(0.7f, stages.back() - 1));
  for (bool asks : {true, false}) {
    engine::Request r =
        testing::GreedyRequest(Prompt(40, asks ? 4 : 5, model_->config.vocab_size), 6);
    if (asks) r.lazy = eo.lazy.default_schedule;
    const testing::Completion c = testing::RunRequest(eng, r);
    ASSERT_TRUE(c.status.ok()) << c.status;
    EXPECT_EQ(c.tokens.size(), 6u);
    EXPECT_EQ(c.usage.lazy_stage_tokens, stages) << (asks ? "asks" : "default");
    EXPECT_TRUE(c.usage.lazy_skipped.empty());
  }
}

#else

TEST(CudaLazyTest, Skipped) { GTEST_SKIP() << "built without CUDA (SUPERPOSE_HAVE_CUDA is off)"; }

#endif

}  // namespace
}  // namespace superpose
