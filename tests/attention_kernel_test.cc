// The CPU attention kernel (engine/cpu/attention.h) on every SIMD target the CPU has
// (tests/simd_targets.h): against a double-precision reference over a paged pool with
// partial blocks, float32 and bfloat16 KV; a query's output is bitwise the same whatever
// other queries share the call (decode alone, in a batch, or as a row of a prefill
// chunk). Needs nothing but the kernels: scripts/arm-check.sh runs it on aarch64 (NEON)
// under qemu-user. The backend-level attention tests are in cpu_attention_test.cc.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "engine/cpu/attention.h"
#include "engine/model/weights.h"
#include "tests/simd_targets.h"

namespace superpose {
namespace {

using engine::cpu::AttnKeys;
using engine::cpu::AttnScratch;
using engine::cpu::KeyElement;
using engine::cpu::KvLayerView;

struct PoolCase {
  int32_t block_size, head_dim, kv_heads;
  bool bf16 = false;  // KV stored as bfloat16
};

class AttentionKernelTest : public ::testing::TestWithParam<PoolCase> {
 protected:
  void SetUp() override {
    const PoolCase c = GetParam();
    bs_ = c.block_size;
    D_ = c.head_dim;
    kvn_ = c.kv_heads;
    std::mt19937 rng(1234 + bs_ * 7 + D_);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    k_.resize(static_cast<size_t>(kBlocks) * bs_ * kvn_ * D_);
    v_.resize(k_.size());
    for (float& x : k_) x = nd(rng);
    for (float& x : v_) x = nd(rng);
    if (c.bf16) {  // the reference sees exactly the stored (rounded) values
      for (float& x : k_) k16_.push_back(engine::F32ToBf16(x)), x = engine::Bf16ToF32(k16_.back());
      for (float& x : v_) v16_.push_back(engine::F32ToBf16(x)), x = engine::Bf16ToF32(v16_.back());
    }
    // Keys: a partial block, whole blocks out of order, a segment starting mid-block,
    // then new tokens one slot at a time (some crossing into the next block).
    keys_.Append(3, bs_ / 2, bs_ - bs_ / 2, bs_);
    keys_.Append(7, 0, bs_, bs_);
    keys_.Append(1, 0, bs_, bs_);
    keys_.Append(5, 1, bs_ - 3, bs_);
    keys_.Append(0, 0, bs_, bs_);
    for (int32_t i = 0; i < 21; ++i) keys_.Append(9 + (i + 5) / bs_, (i + 5) % bs_, 1, bs_);
    nk_total_ = static_cast<int32_t>(keys_.slots.size());
    // Queries: 4 heads x the last 5 rows (nk grows by one per row), then 3 with short
    // contexts.
    for (int32_t r = 0; r < 5; ++r) {
      for (int32_t h = 0; h < 4; ++h) nks_.push_back(nk_total_ - 4 + r - (r == 4 ? 1 : 0));
    }
    nks_.push_back(1);
    nks_.push_back(17);
    nks_.push_back(bs_ + 3);
    q_.resize(nks_.size() * D_);
    for (float& x : q_) x = nd(rng);
  }
  KvLayerView View() const {
    if (!k16_.empty()) return {k16_.data(), v16_.data(), kvn_, D_, bs_, true};
    return {k_.data(), v_.data(), kvn_, D_, bs_, false};
  }
  // outs for queries [first, first + n) computed in one call.
  void Run(int32_t kvh, int32_t first, int32_t n, std::vector<float>* out) {
    std::vector<const float*> qs;
    std::vector<float*> os;
    for (int32_t i = first; i < first + n; ++i) {
      qs.push_back(&q_[static_cast<size_t>(i) * D_]);
      os.push_back(&(*out)[static_cast<size_t>(i) * D_]);
    }
    engine::cpu::Attend(View(), kvh, keys_, n, qs.data(), nks_.data() + first,
                        1.0f / std::sqrt(static_cast<float>(D_)), os.data(), &scratch_);
  }

  static constexpr int32_t kBlocks = 16;
  int32_t bs_ = 0, D_ = 0, kvn_ = 0, nk_total_ = 0;
  std::vector<float> k_, v_, q_;
  std::vector<uint16_t> k16_, v16_;
  std::vector<int32_t> nks_;
  AttnKeys keys_;
  AttnScratch scratch_;
};

TEST_P(AttentionKernelTest, MatchesDoubleReference) {
  const int32_t n = static_cast<int32_t>(nks_.size());
  testing::ForEachSimdTarget([&](const std::string& target) {
    for (int32_t kvh = 0; kvh < kvn_; ++kvh) {
      std::vector<float> out(static_cast<size_t>(n) * D_, -7.0f);
      Run(kvh, 0, n, &out);
      for (int32_t i = 0; i < n; ++i) {
        const float* q = &q_[static_cast<size_t>(i) * D_];
        std::vector<double> s(nks_[i]);
        double mx = -1e300;
        for (int32_t k = 0; k < nks_[i]; ++k) {
          const int64_t slot = keys_.slots[k];
          double dot = 0;
          for (int32_t d = 0; d < D_; ++d) {
            dot +=
                static_cast<double>(q[d]) *
                k_[KeyElement(slot / bs_, static_cast<int32_t>(slot % bs_), kvh, d, kvn_, D_, bs_)];
          }
          s[k] = dot / std::sqrt(static_cast<double>(D_));
          mx = std::max(mx, s[k]);
        }
        double sum = 0;
        for (double& x : s) sum += (x = std::exp(x - mx));
        for (int32_t d = 0; d < D_; ++d) {
          double want = 0;
          for (int32_t k = 0; k < nks_[i]; ++k) {
            want += s[k] / sum * v_[(keys_.slots[k] * kvn_ + kvh) * D_ + d];
          }
          EXPECT_NEAR(out[static_cast<size_t>(i) * D_ + d], want, 1e-4)
              << target << " query " << i << " d " << d;
        }
      }
    }
  });
}

TEST_P(AttentionKernelTest, QueryOutputDoesNotDependOnItsCompany) {
  const int32_t n = static_cast<int32_t>(nks_.size());
  testing::ForEachSimdTarget([&](const std::string& target) {
    std::vector<float> together(static_cast<size_t>(n) * D_), alone(together.size()),
        split(together.size());
    Run(1, 0, n, &together);
    for (int32_t i = 0; i < n; ++i) Run(1, i, 1, &alone);
    for (int32_t first = 0, step = 3; first < n; first += step, step = step % 5 + 2) {
      Run(1, first, std::min(step, n - first), &split);
    }
    EXPECT_EQ(0, std::memcmp(together.data(), alone.data(), together.size() * sizeof(float)))
        << target;
    EXPECT_EQ(0, std::memcmp(together.data(), split.data(), together.size() * sizeof(float)))
        << target;
  });
}

// The name the server logs is the code that runs: each target the test pins.
TEST(CpuAttention, KernelNameIsTheDispatchedTarget) {
  testing::ForEachSimdTarget(
      [](const std::string& target) { EXPECT_EQ(engine::cpu::AttnKernelName(), target); });
}

INSTANTIATE_TEST_SUITE_P(Pools, AttentionKernelTest,
                         ::testing::Values(PoolCase{16, 64, 2}, PoolCase{16, 8, 2},
                                           PoolCase{8, 80, 3}, PoolCase{32, 128, 2},
                                           PoolCase{16, 24, 2}, PoolCase{16, 64, 2, true},
                                           PoolCase{16, 8, 2, true}, PoolCase{8, 80, 3, true}),
                         [](const auto& info) {
                           return "bs" + std::to_string(info.param.block_size) + "_d" +
                                  std::to_string(info.param.head_dim) +
                                  (info.param.bf16 ? "_bf16" : "");
                         });

}  // namespace
}  // namespace superpose
