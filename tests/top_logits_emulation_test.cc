// The compact-logits kernel's body (cuda/top_logits_body.h) run on CPU threads, one
// std::thread per CUDA thread and a barrier for __syncthreads, against the host's
// engine::SelectTopLogits (ids and logits bitwise: selection does no arithmetic) and
// engine::LogSumExp (float sums on the device: 2e-5 relative). Shared memory starts
// poisoned, so a read before a write shows up. The GPU test (cuda_backend_test) runs the
// same body as a kernel.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cuda/top_logits_body.h"
#include "engine/backend.h"
#include "tests/block_emulation.h"

namespace superpose {
namespace {

struct Result {
  std::vector<engine::TopLogit> top;
  float lse;
};

Result Emulate(const std::vector<float>& row, int32_t n, int threads) {
  auto sh = std::make_unique<cuda::TopLogitsShared>();
  std::memset(sh.get(), 0xFF, sizeof(*sh));  // NaN floats, huge counts
  std::vector<int32_t> ids(cuda::kTopMax, -7);
  std::vector<float> logits(cuda::kTopMax, std::nanf(""));
  float lse = std::nanf("");
  testing::RunBlock(threads, [&](testing::BlockCtx& c) {
    cuda::TopLogitsRow(c, row.data(), static_cast<int32_t>(row.size()), n, *sh, ids.data(),
                       logits.data(), &lse);
  });
  Result r{{}, lse};
  for (int32_t i = 0; i < n; ++i) r.top.push_back({ids[i], logits[i]});
  return r;
}

void Check(const std::vector<float>& row, int32_t n, int threads, const std::string& what) {
  SCOPED_TRACE(what + " V=" + std::to_string(row.size()) + " n=" + std::to_string(n) +
               " threads=" + std::to_string(threads));
  const Result got = Emulate(row, n, threads);
  std::vector<engine::TopLogit> want;
  engine::SelectTopLogits(row, n, &want);
  ASSERT_EQ(got.top.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(got.top[i].id, want[i].id) << "rank " << i;
    EXPECT_EQ(got.top[i].logit, want[i].logit) << "rank " << i;
  }
  const float lse = engine::LogSumExp(row);
  EXPECT_NEAR(got.lse, lse, 2e-5 * std::max(1.0f, std::fabs(lse)));
}

std::vector<float> Gaussian(int32_t V, uint32_t seed, float mean = 0.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(mean, 3.0f);
  std::vector<float> row(V);
  for (float& x : row) x = d(rng);
  return row;
}

TEST(TopLogitsEmulationTest, MatchesTheHostSelection) {
  for (int32_t V : {1, 5, 300, 32000}) {
    for (int32_t n : {1, 2, 40, 64}) {
      if (n > V) continue;
      Check(Gaussian(V, V + n), n, cuda::kTopThreads, "gaussian");
    }
  }
  Check(Gaussian(128256, 3, -40.0f), 64, cuda::kTopThreads, "llama3 vocabulary, all negative");
  Check(Gaussian(1000, 4), 17, 64, "fewer threads");
  Check(Gaussian(100, 5), 64, cuda::kTopThreads, "fewer tokens than threads");
}

TEST(TopLogitsEmulationTest, TiesGoToTheLowerIds) {
  // Ties at the top, across the cut, and a flat row (every token tied).
  std::vector<float> row = Gaussian(5000, 8);
  for (int32_t i : {4999, 17, 2500, 3}) row[i] = 20.0f;
  for (int32_t i = 100; i < 5000; i += 50) row[i] = 12.5f;  // 98 tokens tied at the cut
  Check(row, 1, cuda::kTopThreads, "tie at the top");
  Check(row, 3, cuda::kTopThreads, "tie at the top");
  Check(row, 40, cuda::kTopThreads, "tie across the cut");
  Check(std::vector<float>(3000, -1.25f), 64, cuda::kTopThreads, "flat row");
}

TEST(TopLogitsEmulationTest, SignedZerosAndInfinities) {
  std::vector<float> row = Gaussian(700, 9, -10.0f);
  for (float& x : row) x = std::min(x, -1.0f);
  // +0 equals -0 as a float: the two lower ids win, whatever their signs.
  row[3] = -0.0f;
  row[5] = -0.0f;
  row[9] = 0.0f;
  row[600] = -INFINITY;
  row[601] = -INFINITY;
  Check(row, 2, cuda::kTopThreads, "signed zeros");
  Check(row, 3, cuda::kTopThreads, "signed zeros");
  std::vector<float> masked(512, -INFINITY);
  masked[77] = 1.0f;
  masked[300] = 2.0f;
  Check(masked, 2, cuda::kTopThreads, "masked row");
}

}  // namespace
}  // namespace superpose
