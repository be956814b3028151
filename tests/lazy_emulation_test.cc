// LazyLLM's score-row kernels (cuda/lazy_body.h) run on CPU threads: one std::thread
// per CUDA thread of a block (kLazyThreads), a barrier for __syncthreads, the K cache
// in bf16 as the device stores it (load widens, as __bfloat162float does). Checks the
// key indexing (scattered pool slots, each item's own key list and output range), the
// GQA head -> kv head mapping, the max-subtracted softmax and the sum over the heads
// against a float64 reference, for key counts 1, 15, 16, 17 and 300 (below, at and
// across the block's thread count and the attention's 16-key vectors).
//
// Tolerance: each logit is a float32 dot product of D terms (|q|, |k| <= 2, scale
// 1/sqrt(D)): absolute error below D * 2^-23 * 4 / sqrt(D) ~ 4e-6 for D = 128; exp and
// the normalisation add a few ulp, so each head's probability is within ~1e-5
// relative of the reference, and the sum over qh heads (each <= 1) within
// 2e-5 * qh absolute. Row sums are qh (each head's row sums to 1) within the same.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "cuda/lazy_body.h"
#include "engine/model/weights.h"
#include "tests/block_emulation.h"

namespace superpose {
namespace {

struct HostCtx : testing::BlockCtx {
  float load(const uint16_t* p, int64_t i) const { return engine::Bf16ToF32(p[i]); }
};

struct Case {
  int32_t qh, kvh, D;
  std::vector<int32_t> nks;  // one item per key count
};

class LazyEmulationTest : public ::testing::TestWithParam<Case> {};

TEST_P(LazyEmulationTest, ScoreRowsMatchFloat64Softmax) {
  const Case cs = GetParam();
  const int32_t qh = cs.qh, kvh = cs.kvh, D = cs.D, G = qh / kvh;
  const int32_t slots = 512, rows = 6;
  std::mt19937 rng(1234 + qh * 7 + D);
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  std::vector<float> q(static_cast<size_t>(rows) * qh * D);
  for (float& v : q) v = u(rng);
  std::vector<uint16_t> kc(static_cast<size_t>(slots) * kvh * D);
  for (uint16_t& v : kc) v = engine::F32ToBf16(u(rng));
  // Items: each its own query row, a scattered key list (pool slots in random order).
  std::vector<int32_t> keys;
  std::vector<cuda::LazyScoreItem> items;
  int32_t out_total = 0;
  for (size_t i = 0; i < cs.nks.size(); ++i) {
    cuda::LazyScoreItem it;
    it.row = static_cast<int32_t>(i % rows);
    it.key_off = static_cast<int32_t>(keys.size());
    it.nk = cs.nks[i];
    it.out_off = out_total;
    out_total += it.nk;
    std::vector<int32_t> perm(slots);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    keys.insert(keys.end(), perm.begin(), perm.begin() + it.nk);
    items.push_back(it);
  }
  std::vector<float> head_rows(static_cast<size_t>(out_total) * qh, std::nanf(""));
  std::vector<float> out(out_total, std::nanf(""));
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  for (const cuda::LazyScoreItem& it : items) {
    for (int32_t h = 0; h < qh; ++h) {
      std::vector<float> red(cuda::kLazyThreads, std::nanf(""));
      testing::RunBlock<HostCtx>(cuda::kLazyThreads, [&](HostCtx& c) {
        cuda::LazyHeadRowBlock(c, it, h, q.data(), kc.data(), keys.data(), qh, kvh, D, scale,
                               red.data(), head_rows.data());
      });
    }
    testing::RunBlock<HostCtx>(cuda::kLazyThreads, [&](HostCtx& c) {
      cuda::LazyHeadSumBlock(c, it, qh, head_rows.data(), out.data());
    });
  }
  for (const cuda::LazyScoreItem& it : items) {
    std::vector<double> want(it.nk, 0.0);
    for (int32_t h = 0; h < qh; ++h) {
      const int32_t g = h / G;
      std::vector<double> logit(it.nk);
      double mx = -INFINITY, sum = 0.0;
      for (int32_t k = 0; k < it.nk; ++k) {
        double dot = 0.0;
        for (int32_t d = 0; d < D; ++d) {
          const size_t e = (static_cast<size_t>(keys[it.key_off + k]) * kvh + g) * D + d;
          dot += static_cast<double>(q[(static_cast<size_t>(it.row) * qh + h) * D + d]) *
                 engine::Bf16ToF32(kc[e]);
        }
        logit[k] = dot / std::sqrt(static_cast<double>(D));
        mx = std::max(mx, logit[k]);
      }
      for (double& v : logit) sum += (v = std::exp(v - mx));
      for (int32_t k = 0; k < it.nk; ++k) want[k] += logit[k] / sum;
    }
    double total = 0.0;
    for (int32_t k = 0; k < it.nk; ++k) {
      ASSERT_NEAR(out[it.out_off + k], want[k], 2e-5 * qh) << "nk " << it.nk << " key " << k;
      total += out[it.out_off + k];
    }
    EXPECT_NEAR(total, qh, 2e-5 * qh) << "nk " << it.nk;
  }
}

INSTANTIATE_TEST_SUITE_P(KeyCountsAndGroups, LazyEmulationTest,
                         ::testing::Values(Case{4, 2, 64, {1, 15, 16, 17, 300}},
                                           Case{8, 2, 128, {1, 17, 300}},
                                           Case{4, 4, 32, {16, 300, 1}},
                                           Case{6, 1, 64, {15, 300}}));

}  // namespace
}  // namespace superpose
