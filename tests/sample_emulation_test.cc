// Row sampling on the backend (engine/row_sampling.h): the CUDA kernel's body
// (cuda/sample_body.h) on CPU threads against the host reference (the same token for
// every row: exact integer masses, the same exp and log here), and the reference against
// the distribution it must sample (frequencies over many draws).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cuda/sample_body.h"
#include "engine/row_sampling.h"
#include "tests/block_emulation.h"
#include "tests/truncated_softmax.h"

namespace superpose {
namespace {

std::pair<int32_t, float> Emulate(const std::vector<float>& row, const engine::RowSampling& s,
                                  int threads = cuda::kSampleThreads) {
  auto sh = std::make_unique<cuda::SampleShared>();
  std::memset(sh.get(), 0xFF, sizeof(*sh));
  int32_t token = -7;
  float logit = std::nanf("");
  testing::RunBlock(threads, [&](testing::BlockCtx& c) {
    cuda::SampleRowBlock(c, row.data(), static_cast<int32_t>(row.size()), s, *sh, &token, &logit);
  });
  return {token, logit};
}

std::vector<float> Row(int32_t V, uint32_t seed, float spread) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, spread);
  std::vector<float> row(V);
  for (float& x : row) x = d(rng);
  for (int i = 0; i < 5; ++i) row[rng() % V] = 4.0f + static_cast<float>(i);
  return row;
}

engine::RowSampling Params(float t, float top_p, float min_p, uint64_t seed, int64_t draw) {
  engine::RowSampling s;
  s.temperature = t;
  s.top_p = top_p;
  s.min_p = min_p;
  s.seed = seed;
  s.draw = draw;
  return s;
}

TEST(SampleEmulationTest, KernelDrawsTheReferenceToken) {
  const engine::RowSampling settings[] = {
      Params(1.0f, 1.0f, 0.0f, 1, 0),  Params(0.7f, 0.9f, 0.0f, 2, 3),
      Params(1.3f, 1.0f, 0.05f, 3, 9), Params(0.8f, 0.5f, 0.02f, 4, 1),
      Params(2.0f, 0.95f, 0.0f, 5, 7), Params(0.5f, 0.3f, 0.0f, 6, 2),
  };
  int checked = 0, distinct = 0;
  for (int32_t V : {7, 300, 5000}) {
    for (const engine::RowSampling& base : settings) {
      int32_t last = -1;
      for (int draw = 0; draw < 6; ++draw) {
        engine::RowSampling s = base;
        s.draw = draw;
        const std::vector<float> row = Row(V, V * 10 + draw, 1.0f + 0.5f * draw);
        const auto [token, logit] = Emulate(row, s);
        const int32_t want = engine::SampleRowReference(row.data(), V, s);
        ASSERT_EQ(token, want) << "V=" << V << " T=" << s.temperature << " top_p=" << s.top_p
                               << " min_p=" << s.min_p << " draw " << draw;
        ASSERT_EQ(logit, row[token]);
        distinct += token != last;
        last = token;
        ++checked;
      }
    }
  }
  EXPECT_EQ(checked, 108);
  EXPECT_GT(distinct, 50);  // the draws vary with the row and the draw index
}

TEST(SampleEmulationTest, TiesAndFlatRows) {
  std::vector<float> flat(3000, 0.5f);
  for (float top_p : {0.1f, 0.5f, 1.0f}) {
    for (int draw = 0; draw < 4; ++draw) {
      const engine::RowSampling s = Params(1.0f, top_p, 0.0f, 9, draw);
      const int32_t got = Emulate(flat, s).first;
      EXPECT_EQ(got, engine::SampleRowReference(flat.data(), 3000, s));
      if (top_p < 1.0f) {
        EXPECT_LT(got, static_cast<int32_t>(3000 * top_p) + 2);
      }
    }
  }
  std::vector<float> row = Row(1000, 5, 1.0f);
  row[3] = -0.0f;
  row[700] = 0.0f;
  for (int draw = 0; draw < 4; ++draw) {
    const engine::RowSampling s = Params(0.9f, 0.8f, 0.0f, 10, draw);
    EXPECT_EQ(Emulate(row, s, 64).first, engine::SampleRowReference(row.data(), 1000, s));
  }
}

// The reference samples softmax(x / T) restricted to the kept tokens: frequencies over
// 20000 draws within 5 standard deviations of the probabilities.
TEST(SampleEmulationTest, ReferenceSamplesTheTruncatedSoftmax) {
  const std::vector<float> row = {2.0f, 1.5f, 1.0f, 0.2f, -1.0f, -3.0f, 0.0f, 1.2f};
  const int32_t V = static_cast<int32_t>(row.size());
  for (const auto& [t, top_p, min_p] : std::vector<std::tuple<float, float, float>>{
           {1.0f, 1.0f, 0.0f}, {0.7f, 0.8f, 0.0f}, {1.5f, 1.0f, 0.2f}}) {
    const std::vector<double> p = testing::TruncatedSoftmax(row, t, 0, top_p, min_p);
    const int draws = 20000;
    std::vector<int> count(V, 0);
    for (int d = 0; d < draws; ++d) {
      ++count[engine::SampleRowReference(row.data(), V, Params(t, top_p, min_p, 77, d))];
    }
    testing::ExpectFrequencies(count, p, draws,
                               absl::StrCat("T=", t, " top_p=", top_p, " min_p=", min_p));
  }
}

}  // namespace
}  // namespace superpose
