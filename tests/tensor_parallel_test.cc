// Tensor parallelism on the CPU (thread communicator): tp = 2 and 4 give the logits of
// tp = 1 within 1e-5 relative (to the row's largest |logit|) and the same greedy tokens.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <future>
#include <memory>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "engine/cpu/thread_communicator.h"
#include "engine/runtime/engine.h"
#include "engine/runtime/model_bundle.h"
#include "engine/shard_weights.h"
#include "engine/tensor_parallel.h"
#include "tests/forwarding_backend.h"
#include "tests/test_util.h"

namespace superpose {
namespace {

void CompareTp(const engine::ModelBundle& model, const std::vector<int32_t>& prompt) {
  engine::BackendOptions opts;
  opts.kv_num_blocks = 32;
  auto ref = engine::cpu::MakeCpuBackend(opts);
  ASSERT_TRUE(ref->Load(model.config, *model.weights, engine::Shard{}).ok());
  const auto want = testing::RunSteps(*ref, prompt, 12);
  for (int tp : {2, 4}) {
    opts.tensor_parallel = tp;
    auto b = engine::cpu::MakeCpuBackend(opts);
    absl::Status st = b->Load(model.config, *model.weights, engine::Shard{});
    ASSERT_TRUE(st.ok()) << "tp=" << tp << ": " << st;
    const auto got = testing::RunSteps(*b, prompt, 12);
    ASSERT_EQ(got.size(), want.size());
    for (size_t s = 0; s < want.size(); ++s) {
      ASSERT_EQ(got[s].size(), want[s].size());
      float mx = 0;
      for (float v : want[s]) mx = std::max(mx, std::abs(v));
      for (size_t i = 0; i < want[s].size(); ++i) {
        ASSERT_NEAR(got[s][i], want[s][i], 1e-5f * mx)
            << "tp=" << tp << " step " << s << " id " << i;
      }
    }
  }
}

TEST(TensorParallelTest, Stories260kMatchesSingleRank) {
  auto model = engine::LoadModelBundle(testing::Stories260kDir());
  ASSERT_TRUE(model.ok()) << model.status();
  CompareTp(*model, {1, 403, 407, 261, 378});
}

TEST(TensorParallelTest, BuiltinWithReplicatedKvHeadsMatchesSingleRank) {
  // 4 query heads, 2 kv heads: tp = 4 replicates each kv head on two ranks.
  auto model = engine::LoadModelBundle("");
  ASSERT_TRUE(model.ok()) << model.status();
  CompareTp(*model, {256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100});
}

TEST(TensorParallelTest, GoldenGreedyThroughTheEngineAtTp2And4) {
  auto model = engine::LoadModelBundle(testing::Stories260kDir());
  ASSERT_TRUE(model.ok());
  auto golden = testing::ReadJson(testing::Stories260kDir() + "/golden.json");
  for (int tp : {2, 4}) {
    engine::BackendOptions opts;
    opts.kv_num_blocks = 64;
    opts.tensor_parallel = tp;
    auto b = engine::cpu::MakeCpuBackend(opts);
    ASSERT_TRUE(b->Load(model->config, *model->weights, engine::Shard{}).ok());
    engine::Engine eng(engine::EngineOptions{}, model->config, model->tokenizer.get(), b.get());
    eng.Start();
    for (const auto& c : golden["generation"]) {
      auto r = testing::RunRequest(
          eng, testing::GreedyRequest(c["prompt_ids"].get<std::vector<int32_t>>(), 64));
      ASSERT_TRUE(r.status.ok());
      EXPECT_EQ(r.tokens, c["completion_ids"].get<std::vector<int32_t>>()) << "tp=" << tp;
    }
    eng.Shutdown(absl::Seconds(1));
  }
}

TEST(TensorParallelTest, IndivisibleShapesAreRejected) {
  auto model = engine::LoadModelBundle(testing::Stories260kDir());
  ASSERT_TRUE(model.ok());
  engine::BackendOptions opts;
  opts.tensor_parallel = 3;  // 8 heads % 3 != 0
  auto b = engine::cpu::MakeCpuBackend(opts);
  absl::Status st = b->Load(model->config, *model->weights, engine::Shard{});
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(st.message()), ::testing::HasSubstr("num_attention_heads"));
}

// The shared sharded reader (both backends load through it): the ranks' parts put
// together are the whole tensors, in the layout the backends compute with.
TEST(ShardedWeightReaderTest, RanksTogetherAreTheWholeModel) {
  auto model = engine::LoadModelBundle(testing::Stories260kDir());
  ASSERT_TRUE(model.ok());
  const engine::ModelConfig& c = model->config;
  auto whole = engine::ShardedWeightReader::Create(c, *model->weights, engine::Shard{});
  ASSERT_TRUE(whole.ok()) << whole.status();
  const int64_t H = c.hidden_size, D = c.head_dim, I = c.intermediate_size;
  const int32_t l = 1;
  std::vector<float> qkv(whole->qkv_rows() * H), down(H * I), gate_up(2 * I * H),
      emb(c.vocab_size * H);
  ASSERT_TRUE(whole->Qkv(l, qkv.data()).ok());
  ASSERT_TRUE(whole->Down(l, down.data()).ok());
  ASSERT_TRUE(whole->GateUp(l, gate_up.data()).ok());
  ASSERT_TRUE(whole->Embedding(emb.data()).ok());
  const int32_t tp = 2;
  for (int32_t r = 0; r < tp; ++r) {
    auto part = engine::ShardedWeightReader::Create(c, *model->weights, engine::Shard{r, tp});
    ASSERT_TRUE(part.ok()) << part.status();
    const engine::ShardLayout& lay = part->layout();
    std::vector<float> p_qkv(part->qkv_rows() * H), p_down(H * lay.inter),
        p_gate_up(2 * lay.inter * H), p_emb(static_cast<size_t>(lay.vocab_local) * H);
    ASSERT_TRUE(part->Qkv(l, p_qkv.data()).ok());
    ASSERT_TRUE(part->Down(l, p_down.data()).ok());
    ASSERT_TRUE(part->GateUp(l, p_gate_up.data()).ok());
    ASSERT_TRUE(part->Embedding(p_emb.data()).ok());
    // q rows of this rank's heads; k rows of its kv heads.
    const int64_t q0 = int64_t{r} * lay.q_heads * D * H, nq = int64_t{lay.q_heads} * D * H;
    EXPECT_TRUE(std::equal(p_qkv.begin(), p_qkv.begin() + nq, qkv.begin() + q0)) << r;
    const int64_t k_whole = int64_t{c.num_heads} * D * H + int64_t{lay.kv_head_begin} * D * H;
    EXPECT_TRUE(std::equal(p_qkv.begin() + nq, p_qkv.begin() + nq + int64_t{lay.kv_heads} * D * H,
                           qkv.begin() + k_whole))
        << r;
    for (int64_t row = 0; row < H; ++row) {  // down: this rank's columns
      EXPECT_TRUE(std::equal(p_down.begin() + row * lay.inter,
                             p_down.begin() + (row + 1) * lay.inter,
                             down.begin() + row * I + int64_t{r} * lay.inter))
          << r << " row " << row;
    }
    // gate rows, then up rows, of this rank's columns.
    const int64_t g0 = int64_t{r} * lay.inter * H, n = int64_t{lay.inter} * H;
    EXPECT_TRUE(std::equal(p_gate_up.begin(), p_gate_up.begin() + n, gate_up.begin() + g0)) << r;
    EXPECT_TRUE(std::equal(p_gate_up.begin() + n, p_gate_up.end(), gate_up.begin() + I * H + g0))
        << r;
    EXPECT_TRUE(std::equal(p_emb.begin(), p_emb.end(), emb.begin() + int64_t{lay.vocab_begin} * H))
        << r;
  }
  // A shard the shapes do not allow is rejected when the reader is made.
  EXPECT_EQ(
      engine::ShardedWeightReader::Create(c, *model->weights, engine::Shard{0, 3}).status().code(),
      absl::StatusCode::kInvalidArgument);
}

// Load honours its Shard: a group loads the whole model only, a rank backend the shard
// of its communicator only.
TEST(TensorParallelTest, LoadChecksTheShard) {
  auto model = engine::LoadModelBundle(testing::Stories260kDir());
  ASSERT_TRUE(model.ok());
  engine::BackendOptions opts;
  opts.kv_num_blocks = 4;
  opts.tensor_parallel = 2;
  auto group = engine::cpu::MakeCpuBackend(opts);
  EXPECT_EQ(group->Load(model->config, *model->weights, engine::Shard{1, 2}).code(),
            absl::StatusCode::kInvalidArgument);
  opts.tensor_parallel = 1;
  engine::cpu::CpuBackend plain(opts);
  EXPECT_EQ(plain.Load(model->config, *model->weights, engine::Shard{0, 2}).code(),
            absl::StatusCode::kInvalidArgument);
  auto threads = std::make_shared<engine::cpu::ThreadGroup>(2);
  auto comm = threads->Rank(1);
  engine::cpu::CpuBackend rank1(opts, {}, comm.get());
  EXPECT_EQ(rank1.Load(model->config, *model->weights, engine::Shard{0, 2}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(rank1.Load(model->config, *model->weights, engine::Shard{}).code(),
            absl::StatusCode::kInvalidArgument);
}

// Rank 1 of a group, whose Forward fails (before its first collective) once armed.
class FailingRank : public testing::ForwardingBackend {
 public:
  explicit FailingRank(std::unique_ptr<engine::Backend> inner)
      : ForwardingBackend(inner.get()), owned_(std::move(inner)) {}
  absl::Status Forward(const engine::BatchPlan& plan, engine::ForwardOutput* out) override {
    if (armed) return absl::InternalError("injected failure of rank 1");
    return inner()->Forward(plan, out);
  }
  std::atomic<bool> armed{false};

 private:
  std::unique_ptr<engine::Backend> owned_;
};

// A rank whose step fails mid-way must not leave the others waiting in a collective
// for it (a hang of the engine thread): the group is aborted, the step returns the
// rank's error, and every later step fails at once. A bad plan, which every rank would
// reject alike before any collective, is rejected up front and does not abort it.
TEST(TensorParallelTest, AFailingRankAbortsTheGroupInsteadOfHanging) {
  auto model = engine::LoadModelBundle(testing::Stories260kDir());
  ASSERT_TRUE(model.ok());
  auto group = std::make_shared<engine::cpu::ThreadGroup>(2);
  std::vector<std::unique_ptr<engine::Communicator>> comms;
  std::vector<std::unique_ptr<engine::Backend>> ranks;
  FailingRank* rank1 = nullptr;
  for (int32_t r = 0; r < 2; ++r) {
    comms.push_back(group->Rank(r));
    engine::BackendOptions o;
    o.kv_num_blocks = 8;
    auto cpu =
        std::make_unique<engine::cpu::CpuBackend>(o, engine::cpu::CpuOptions{}, comms.back().get());
    if (r == 0) {
      ranks.push_back(std::move(cpu));
    } else {
      auto f = std::make_unique<FailingRank>(std::move(cpu));
      rank1 = f.get();
      ranks.push_back(std::move(f));
    }
  }
  engine::TensorParallelBackend tp(std::move(ranks), std::move(comms), group);
  ASSERT_TRUE(tp.Load(model->config, *model->weights, engine::Shard{}).ok());
  engine::BatchPlan plan;
  plan.seqs.resize(1);
  for (int32_t i = 0; i < 5; ++i) {
    plan.tokens.push_back(1 + i);
    plan.positions.push_back(static_cast<float>(i));
    plan.kv_slots.push_back({0, i});
  }
  plan.seqs[0].num_tokens = 5;
  plan.logits_for = {4};
  engine::ForwardOutput out;
  ASSERT_TRUE(tp.Forward(plan, &out).ok());

  engine::BatchPlan bad = plan;
  bad.tokens[2] = model->config.vocab_size;  // not a token
  EXPECT_EQ(tp.Forward(bad, &out).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(tp.Forward(plan, &out).ok()) << "a rejected plan must not abort the group";

  rank1->armed = true;
  auto step = std::async(std::launch::async, [&] {
    engine::ForwardOutput o;
    return tp.Forward(plan, &o);
  });
  ASSERT_EQ(step.wait_for(std::chrono::seconds(60)), std::future_status::ready)
      << "rank 0 still waits in a collective for the failed rank";
  const absl::Status st = step.get();
  EXPECT_EQ(st.code(), absl::StatusCode::kInternal) << st;
  EXPECT_THAT(std::string(st.message()), ::testing::HasSubstr("injected failure"));
  rank1->armed = false;
  const absl::Status later = tp.Forward(plan, &out);
  EXPECT_EQ(later.code(), absl::StatusCode::kFailedPrecondition) << later;
  EXPECT_THAT(std::string(later.message()), ::testing::HasSubstr("aborted"));
  EXPECT_EQ(tp.Health().code(), absl::StatusCode::kFailedPrecondition);

  // An engine over the failed group: the request that hits it fails, then the engine
  // reports the backend's health and turns new requests away at once.
  engine::Engine eng(engine::EngineOptions{}, model->config, model->tokenizer.get(), &tp);
  eng.Start();
  EXPECT_EQ(eng.Health().code(), absl::StatusCode::kFailedPrecondition);
  const auto r = testing::RunRequest(eng, testing::GreedyRequest({1, 2, 3}, 4));
  EXPECT_EQ(r.status.code(), absl::StatusCode::kUnavailable) << r.status;
  EXPECT_THAT(std::string(r.status.message()), ::testing::HasSubstr("restart the server"));
  eng.Shutdown(absl::Seconds(1));
}

}  // namespace
}  // namespace superpose
