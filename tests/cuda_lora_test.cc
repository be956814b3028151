// LoRA adapters on the CUDA backend (cuda/cuda_lora.h, cuda/lora_kernels.cu) on
// stories260k. Skips without a GPU.
//   B = 0                an adapter whose B is zero gives the base logits bitwise (its
//                        term is exactly 0, added to the same base projections)
//   random adapters      ranks 8, 16, 32 on all seven modules, prefill and decode rows,
//                        against the float32 CPU backend loaded with the bf16-rounded
//                        base weights and adapter: every logit within 0.05 * max|logit|
//                        of its row and the mean within 0.01 * max|logit| (the bound
//                        cuda_backend_test uses for the base model: the GPU rounds
//                        activations to bf16 before each projection, the adapter's
//                        included). The adapters move the CPU's logits by more than 3x
//                        that bound, so a GPU that dropped them would fail.
//   mixed batches        sequences with different adapters (and none) in one prefill
//                        step and one decode step get the logits they get alone: every
//                        logit within 0.02 * max|logit| of its row, the mean within
//                        0.004 * max|logit|. The LoRA kernels' per-row sums do not
//                        depend on the batch, but cuBLAS may pick another kernel for
//                        another row count, and a last-bit change before a bf16
//                        rounding of the activations moves that value by up to 2^-8.
//                        A wrong adapter on a row moves its logits by more than 10x
//                        that (checked); decode steps with adapters run eagerly (no
//                        graph replay)
//   refusals             an unloaded adapter is refused with FAILED_PRECONDITION and the
//                        backend keeps serving; a second load of an id: ALREADY_EXISTS
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/lora_adapter.h"
#include "engine/model/weights.h"
#include "engine/runtime/model_bundle.h"
#include "tests/rounded_weights.h"
#include "tests/test_util.h"

#if SUPERPOSE_HAVE_CUDA
#include "cuda/cuda_backend.h"
#endif

namespace superpose {
namespace {

#if SUPERPOSE_HAVE_CUDA

const std::vector<int32_t> kAll = {engine::kLoraQ,   engine::kLoraK,    engine::kLoraV,
                                   engine::kLoraO,   engine::kLoraGate, engine::kLoraUp,
                                   engine::kLoraDown};

using testing::RoundBf16;
using testing::RoundedWeights;

engine::LoraAdapter Rounded(engine::LoraAdapter a) {
  for (auto& layer : a.layers) {
    for (engine::LoraMatrices& m : layer) {
      for (float& v : m.a) v = RoundBf16(v);
      for (float& v : m.b) v = RoundBf16(v);
    }
  }
  return a;
}

// A sequence of a test step: its new tokens from position `pos` (with `pos` cached
// tokens before them), its KV blocks from `first_block`.
struct Seq {
  std::vector<int32_t> tokens;
  int32_t pos = 0;
  int64_t adapter = 0;
  int32_t first_block = 0;
};

// Every new token wants its logits.
engine::BatchPlan Plan(const std::vector<Seq>& seqs, int32_t bs) {
  engine::BatchPlan plan;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const Seq& s = seqs[i];
    engine::SeqPlan sp;
    sp.id = static_cast<engine::SeqId>(i + 1);
    sp.token_begin = plan.num_tokens();
    sp.num_tokens = static_cast<int32_t>(s.tokens.size());
    sp.adapter = s.adapter;
    for (int32_t b = 0; b * bs < s.pos; ++b) {
      sp.context.push_back({s.first_block + b, 0, std::min(bs, s.pos - b * bs)});
    }
    for (size_t j = 0; j < s.tokens.size(); ++j) {
      const int32_t p = s.pos + static_cast<int32_t>(j);
      plan.logits_for.push_back(plan.num_tokens());
      plan.tokens.push_back(s.tokens[j]);
      plan.positions.push_back(static_cast<float>(p));
      plan.kv_slots.push_back({s.first_block + p / bs, p % bs});
    }
    plan.seqs.push_back(sp);
  }
  return plan;
}

std::vector<float> Logits(engine::Backend& b, const engine::BatchPlan& plan) {
  engine::ForwardOutput out;
  absl::Status st = b.Forward(plan, &out);
  EXPECT_TRUE(st.ok()) << st;
  return out.logits;
}

float RowMax(const float* row, int32_t V) {
  float mx = 0;
  for (int32_t v = 0; v < V; ++v) mx = std::max(mx, std::abs(row[v]));
  return mx;
}

// Every row of got within k * max|want row| of want (the mean within mean_k of it).
void ExpectClose(const std::vector<float>& got, const std::vector<float>& want, int32_t V, float k,
                 float mean_k, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  ASSERT_FALSE(want.empty()) << what;
  for (size_t r = 0; r * V < want.size(); ++r) {
    const float mx = RowMax(&want[r * V], V);
    double sum = 0;
    for (int32_t v = 0; v < V; ++v) {
      const float d = std::abs(got[r * V + v] - want[r * V + v]);
      sum += d;
      ASSERT_LE(d, k * mx) << what << " row " << r << " id " << v;
    }
    EXPECT_LE(sum / V, mean_k * mx) << what << " row " << r << " mean difference";
  }
}

// The largest |a - b| over all logits, relative to its row's max|b|.
float MaxRelDiff(const std::vector<float>& a, const std::vector<float>& b, int32_t V) {
  float worst = 0;
  for (size_t r = 0; r * V < b.size() && r * V < a.size(); ++r) {
    const float mx = RowMax(&b[r * V], V);
    for (int32_t v = 0; v < V; ++v) {
      worst = std::max(worst, std::abs(a[r * V + v] - b[r * V + v]) / mx);
    }
  }
  return worst;
}

class CudaLoraTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (!cuda::CudaAvailable(&why)) GTEST_SKIP() << "no usable CUDA device: " << why;
    auto m = engine::LoadModelBundle(testing::Stories260kDir());
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::make_unique<engine::ModelBundle>(*std::move(m));
    V_ = model_->config.vocab_size;
    engine::BackendOptions opts;
    opts.kv_num_blocks = 64;
    gpu_ = std::make_unique<cuda::CudaBackend>(opts, cuda::CudaOptions{}, 0);
    absl::Status st = gpu_->Load(model_->config, *model_->weights, engine::Shard{});
    ASSERT_TRUE(st.ok()) << st;
    bs_ = gpu_->kv().block_size;
  }
  engine::LoraAdapter Adapter(int32_t rank, uint64_t seed, bool b_zero = false) const {
    return Rounded(
        engine::RandomLoraAdapter(model_->config, rank, 2.0f * rank, kAll, seed, 0.15f, b_zero));
  }
  std::unique_ptr<engine::Backend> Cpu() const {
    engine::BackendOptions opts;
    opts.kv_num_blocks = 64;
    engine::cpu::CpuOptions o;
    o.dtype = engine::cpu::WeightDType::kFloat32;
    auto cpu = engine::cpu::MakeCpuBackend(opts, o);
    const auto rounded = RoundedWeights(*model_->weights);
    EXPECT_TRUE(cpu->Load(model_->config, *rounded, engine::Shard{}).ok());
    return cpu;
  }
  // A prefill of `prompt` then one decode step, alone, with `adapter`: both steps' logits.
  std::vector<float> PrefillDecode(engine::Backend& b, int64_t adapter, int32_t first_block,
                                   const std::vector<int32_t>& prompt) {
    std::vector<float> l = Logits(b, Plan({{prompt, 0, adapter, first_block}}, bs_));
    const std::vector<float> d =
        Logits(b, Plan({{{7}, static_cast<int32_t>(prompt.size()), adapter, first_block}}, bs_));
    l.insert(l.end(), d.begin(), d.end());
    return l;
  }

  std::unique_ptr<engine::ModelBundle> model_;
  std::unique_ptr<cuda::CudaBackend> gpu_;
  int32_t V_ = 0, bs_ = 16;
  const std::vector<int32_t> prompt_ = {1, 403, 407, 261, 378, 290, 300, 411, 280, 350};
};

TEST_F(CudaLoraTest, ZeroBGivesTheBaseLogitsExactly) {
  EXPECT_TRUE(gpu_->SupportsAdapters());
  ASSERT_TRUE(gpu_->LoadAdapter(1, Adapter(16, 5, /*b_zero=*/true)).ok());
  const std::vector<float> base = PrefillDecode(*gpu_, 0, 0, prompt_);
  const std::vector<float> zero = PrefillDecode(*gpu_, 1, 0, prompt_);
  ASSERT_FALSE(base.empty());
  EXPECT_EQ(zero, base);
}

TEST_F(CudaLoraTest, RandomAdaptersMatchTheCpuBackend) {
  std::unique_ptr<engine::Backend> cpu = Cpu();
  const std::vector<float> cpu_base = PrefillDecode(*cpu, 0, 0, prompt_);
  int64_t id = 0;
  for (int32_t rank : {8, 16, 32}) {
    SCOPED_TRACE("rank " + std::to_string(rank));
    const engine::LoraAdapter a = Adapter(rank, 10 + rank);
    ++id;
    ASSERT_TRUE(cpu->LoadAdapter(id, a).ok());
    ASSERT_TRUE(gpu_->LoadAdapter(id, a).ok());
    const std::vector<float> want = PrefillDecode(*cpu, id, 0, prompt_);
    const std::vector<float> got = PrefillDecode(*gpu_, id, 0, prompt_);
    EXPECT_GT(MaxRelDiff(want, cpu_base, V_), 3 * 0.05f) << "the adapter barely moves the logits";
    ExpectClose(got, want, V_, 0.05f, 0.01f, "gpu vs cpu");
  }
}

TEST_F(CudaLoraTest, MixedAdapterBatchEqualsEachSequenceAlone) {
  ASSERT_TRUE(gpu_->LoadAdapter(1, Adapter(8, 21)).ok());
  ASSERT_TRUE(gpu_->LoadAdapter(2, Adapter(32, 22)).ok());
  const std::vector<int64_t> adapters = {1, 0, 2, 1, 2};
  std::vector<Seq> prefill, decode;
  for (size_t i = 0; i < adapters.size(); ++i) {
    std::vector<int32_t> p(prompt_.begin(), prompt_.begin() + 3 + 2 * i);  // 3..11 tokens
    const int32_t block = static_cast<int32_t>(8 * i);
    prefill.push_back({p, 0, adapters[i], block});
    decode.push_back(
        {{300 + static_cast<int32_t>(i)}, static_cast<int32_t>(p.size()), adapters[i], block});
  }
  // Alone: each sequence's prefill then its decode step.
  std::vector<std::vector<float>> alone_prefill, alone_decode;
  for (size_t i = 0; i < adapters.size(); ++i) {
    alone_prefill.push_back(Logits(*gpu_, Plan({prefill[i]}, bs_)));
    alone_decode.push_back(Logits(*gpu_, Plan({decode[i]}, bs_)));
  }
  const std::vector<float> mixed_prefill = Logits(*gpu_, Plan(prefill, bs_));
  const int64_t replays = gpu_->graph_stats().replays;
  const std::vector<float> mixed_decode = Logits(*gpu_, Plan(decode, bs_));
  EXPECT_EQ(gpu_->graph_stats().replays, replays) << "a step with adapters replayed a graph";
  size_t row = 0;
  for (size_t i = 0; i < adapters.size(); ++i) {
    SCOPED_TRACE("sequence " + std::to_string(i));
    const size_t n = alone_prefill[i].size();
    const std::vector<float> got(mixed_prefill.begin() + row * V_,
                                 mixed_prefill.begin() + row * V_ + n);
    ExpectClose(got, alone_prefill[i], V_, 0.02f, 0.004f, "prefill");
    row += n / V_;
    const std::vector<float> dgot(mixed_decode.begin() + i * V_,
                                  mixed_decode.begin() + (i + 1) * V_);
    ExpectClose(dgot, alone_decode[i], V_, 0.02f, 0.004f, "decode");
  }
  // Sequence 0 with another adapter, and none: far outside that bound.
  for (int64_t other : {0, 2}) {
    Seq s = prefill[0];
    s.adapter = other;
    EXPECT_GT(MaxRelDiff(Logits(*gpu_, Plan({s}, bs_)), alone_prefill[0], V_), 0.2f) << other;
  }
}

TEST_F(CudaLoraTest, UnloadedAdapterIsRefusedAndTheBackendKeepsServing) {
  ASSERT_TRUE(gpu_->LoadAdapter(3, Adapter(8, 31)).ok());
  EXPECT_EQ(gpu_->LoadAdapter(3, Adapter(8, 32)).code(), absl::StatusCode::kAlreadyExists);
  const engine::BatchPlan with = Plan({{prompt_, 0, 3, 0}}, bs_);
  const std::vector<float> before = Logits(*gpu_, with);
  ASSERT_TRUE(gpu_->UnloadAdapter(3).ok());
  EXPECT_EQ(gpu_->UnloadAdapter(3).code(), absl::StatusCode::kNotFound);
  engine::ForwardOutput out;
  const absl::Status st = gpu_->Forward(with, &out);
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
  EXPECT_NE(st.message().find("adapter 3"), std::string::npos) << st;
  EXPECT_TRUE(gpu_->Health().ok());
  EXPECT_FALSE(Logits(*gpu_, Plan({{prompt_, 0, 0, 0}}, bs_)).empty());
  ASSERT_TRUE(gpu_->LoadAdapter(3, Adapter(8, 31)).ok());
  EXPECT_EQ(Logits(*gpu_, with), before);
}

#else

TEST(CudaLoraTest, Skipped) { GTEST_SKIP() << "built without CUDA (SUPERPOSE_HAVE_CUDA is off)"; }

#endif  // SUPERPOSE_HAVE_CUDA

}  // namespace
}  // namespace superpose
