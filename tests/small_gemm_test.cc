// The weight-streaming GEMM (engine/cpu/small_gemm.h) against a double-precision
// reference, for 1..64 activation rows and sizes that are no multiple of the vector
// width or of the register tile, and its batch invariance: row r of a many-row call is
// bitwise equal to the same row computed alone.
//
// Tolerance: |y - ref| <= 1e-5 * sum_k |x_k * w_k| (relative to the magnitude of the
// products, so cancellation does not make it meaningless). fp32 accumulation over a few
// hundred products in 16 lane-wise partial sums stays well inside that.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "engine/cpu/small_gemm.h"

namespace superpose::engine::cpu {
namespace {

using GemmFn = void (*)(const float*, int32_t, int32_t, const float*, int32_t, float*);

struct Problem {
  int32_t rows, in, out;
  std::vector<float> x, w;
};

Problem MakeProblem(int32_t rows, int32_t in, int32_t out, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  Problem p{rows, in, out, std::vector<float>(static_cast<size_t>(rows) * in),
            std::vector<float>(static_cast<size_t>(out) * in)};
  for (float& v : p.x) v = nd(rng);
  for (float& v : p.w) v = nd(rng);
  return p;
}

void ExpectMatchesReference(GemmFn gemm, const Problem& p) {
  std::vector<float> y(static_cast<size_t>(p.rows) * p.out, std::nanf(""));
  gemm(p.x.data(), p.rows, p.in, p.w.data(), p.out, y.data());
  for (int32_t t = 0; t < p.rows; ++t) {
    for (int32_t o = 0; o < p.out; ++o) {
      double ref = 0, mag = 0;
      for (int32_t k = 0; k < p.in; ++k) {
        const double prod = static_cast<double>(p.x[static_cast<size_t>(t) * p.in + k]) *
                            p.w[static_cast<size_t>(o) * p.in + k];
        ref += prod;
        mag += std::abs(prod);
      }
      ASSERT_NEAR(y[static_cast<size_t>(t) * p.out + o], ref, 1e-5 * mag)
          << "rows " << p.rows << " in " << p.in << " out " << p.out << " at row " << t << " col "
          << o;
    }
  }
}

TEST(SmallGemmTest, ReportsKernel) {
  const std::string name = SmallGemmKernelName();
  EXPECT_TRUE(name == "avx512" || name == "portable") << name;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw")) {
    EXPECT_EQ(name, "avx512");
  }
}

TEST(SmallGemmTest, MatchesReferenceForAllRowCounts) {
  for (int32_t rows = 1; rows <= 64; ++rows) {
    // in: a vector-width multiple plus a tail; out: no multiple of the 6-row tile.
    ExpectMatchesReference(&SmallBatchGemm, MakeProblem(rows, 100, 37, rows));
  }
}

TEST(SmallGemmTest, MatchesReferenceForOddShapes) {
  const int32_t shapes[][3] = {{1, 1, 1},    {3, 15, 5},   {7, 16, 6},    {5, 17, 7},
                               {64, 33, 13}, {9, 257, 64}, {13, 768, 41}, {2, 2049, 11},
                               {64, 130, 1}, {1, 5, 3000}};
  for (const auto& s : shapes) {
    ExpectMatchesReference(&SmallBatchGemm, MakeProblem(s[0], s[1], s[2], s[1] * 31 + s[2]));
  }
}

TEST(SmallGemmTest, PortableKernelMatchesReference) {
  for (int32_t rows : {1, 3, 4, 5, 17, 64}) {
    ExpectMatchesReference(&SmallBatchGemmPortable, MakeProblem(rows, 100, 37, rows + 100));
  }
}

// Large enough that the call runs on threads, with every row-group remainder.
TEST(SmallGemmTest, RowResultsDoNotDependOnTheBatch) {
  for (GemmFn gemm : {&SmallBatchGemm, &SmallBatchGemmPortable}) {
    for (int32_t in : {257, 768}) {
      const int32_t out = 301, rows = 64;
      const Problem p = MakeProblem(rows, in, out, in);
      std::vector<float> all(static_cast<size_t>(rows) * out),
          part(static_cast<size_t>(rows) * out);
      gemm(p.x.data(), rows, in, p.w.data(), out, all.data());
      // Every row alone, and every prefix length (different row-group remainders).
      for (int32_t n = 1; n <= rows; ++n) {
        gemm(p.x.data(), n, in, p.w.data(), out, part.data());
        for (size_t i = 0; i < static_cast<size_t>(n) * out; ++i) {
          ASSERT_EQ(part[i], all[i]) << "in " << in << " prefix " << n << " index " << i;
        }
      }
      for (int32_t t = 0; t < rows; ++t) {
        gemm(p.x.data() + static_cast<size_t>(t) * in, 1, in, p.w.data(), out, part.data());
        for (int32_t o = 0; o < out; ++o) {
          ASSERT_EQ(part[o], all[static_cast<size_t>(t) * out + o])
              << "in " << in << " row " << t << " col " << o;
        }
      }
    }
  }
}

}  // namespace
}  // namespace superpose::engine::cpu
