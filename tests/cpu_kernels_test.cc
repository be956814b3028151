// The CPU backend's weight-streaming GEMM against a double-precision reference
// (tolerance 1e-5 relative to the sum of |products|), and its batch invariance, on every
// SIMD target this CPU supports.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "tests/simd_targets.h"

namespace superpose::engine::cpu {
namespace {

using superpose::testing::ForEachSimdTarget;

TEST(SmallBatchGemmTest, MatchesReference) {
  ForEachSimdTarget([](const std::string&) {
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (int32_t rows : {1, 2, 3, 4, 5, 7, 9, 32}) {
      const int32_t in = 100, out = 37;  // odd sizes: no multiple of the vector width
      std::vector<float> x(rows * in), w(out * in), y(rows * out);
      for (float& v : x) v = nd(rng);
      for (float& v : w) v = nd(rng);
      SmallBatchGemm(x.data(), rows, in, w.data(), out, y.data());
      for (int32_t t = 0; t < rows; ++t) {
        for (int32_t o = 0; o < out; ++o) {
          double ref = 0, mag = 0;
          for (int32_t k = 0; k < in; ++k) {
            ref += static_cast<double>(x[t * in + k]) * w[o * in + k];
            mag += std::abs(static_cast<double>(x[t * in + k]) * w[o * in + k]);
          }
          ASSERT_NEAR(y[t * out + o], ref, 1e-5 * mag) << "rows " << rows << " t " << t;
        }
      }
    }
  });
}

TEST(SmallBatchGemmTest, RowResultsDoNotDependOnTheBatch) {
  ForEachSimdTarget([](const std::string&) {
    std::mt19937 rng(11);
    std::uniform_real_distribution<float> ud(-1.0f, 1.0f);
    const int32_t in = 257, out = 64, rows = 7;
    std::vector<float> x(rows * in), w(out * in), batch(rows * out), single(out);
    for (float& v : x) v = ud(rng);
    for (float& v : w) v = ud(rng);
    SmallBatchGemm(x.data(), rows, in, w.data(), out, batch.data());
    for (int32_t t = 0; t < rows; ++t) {
      SmallBatchGemm(x.data() + t * in, 1, in, w.data(), out, single.data());
      for (int32_t o = 0; o < out; ++o) {
        ASSERT_EQ(batch[t * out + o], single[o]) << "row " << t << " col " << o;
      }
    }
  });
}

}  // namespace
}  // namespace superpose::engine::cpu
