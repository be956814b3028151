// The weight-streaming GEMM (engine/cpu/small_gemm.h), on every SIMD target this CPU
// supports: against a double-precision reference, for 1..64 activation rows (streaming)
// and prefill-sized calls (cache-blocked), with sizes that are no multiple of the vector
// width or of any target's register tile; its batch invariance (row r of a many-row call
// is bitwise equal to the same row computed alone) and thread-count invariance; and
// that every target with fused multiply-add gives bitwise the same result (one sum
// order on all targets).
//
// Tolerance: |y - ref| <= 1e-5 * sum_k |x_k * w_k| (relative to the magnitude of the
// products, so cancellation does not make it meaningless). fp32 accumulation over a few
// thousand products in 16 lane-wise partial sums stays well inside that.
#include <gtest/gtest.h>

#include <omp.h>

#include <cmath>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "engine/cpu/small_gemm.h"
#include "engine/simd.h"
#include "tests/simd_targets.h"

namespace superpose::engine::cpu {
namespace {

using superpose::testing::ForEachSimdTarget;

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

std::vector<float> Gemm(const Problem& p, int32_t rows = -1) {
  if (rows < 0) rows = p.rows;
  std::vector<float> y(static_cast<size_t>(rows) * p.out, std::nanf(""));
  SmallBatchGemm(p.x.data(), rows, p.in, p.w.data(), p.out, y.data());
  return y;
}

void ExpectMatchesReference(const Problem& p) {
  const std::vector<float> y = Gemm(p);
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

TEST(SmallGemmTest, ReportsTheTargetInUse) {
  EXPECT_EQ(SmallGemmKernelName(), simd::ActiveTargetName());
  ForEachSimdTarget([](const std::string& name) { EXPECT_EQ(SmallGemmKernelName(), name); });
}

// A cap (the --simd flags) holds however often the targets are queried afterwards
// (Highway 1.0.3 re-picks the dispatch target on each query; engine/simd.cc).
TEST(SmallGemmTest, DispatchFollowsTheCap) {
  for (int64_t t : simd::AvailableTargets()) {
    const std::string name = simd::TargetName(t);
    ASSERT_TRUE(simd::LimitTargets(name).ok()) << name;
    EXPECT_EQ(simd::ActiveTargetName(), name);
    EXPECT_FALSE(simd::AvailableTargets().empty());
    EXPECT_EQ(SmallGemmKernelName(), name);
    EXPECT_EQ(SmallGemmKernelName(), simd::ActiveTargetName());
  }
  ASSERT_TRUE(simd::LimitTargets("auto").ok());
  EXPECT_EQ(SmallGemmKernelName(), simd::TargetName(simd::AvailableTargets().front()));
}

TEST(SmallGemmTest, MatchesReferenceForAllRowCounts) {
  ForEachSimdTarget([](const std::string&) {
    for (int32_t rows = 1; rows <= 64; ++rows) {
      // in: a multiple of 16 plus a tail; out: no multiple of any tile's width.
      ExpectMatchesReference(MakeProblem(rows, 100, 37, rows));
    }
  });
}

TEST(SmallGemmTest, MatchesReferenceForOddShapes) {
  // Over 64 rows: blocked; in = 2049 makes several weight chunks and row blocks.
  const int32_t shapes[][3] = {{1, 1, 1},      {3, 15, 5},   {7, 16, 6},    {5, 17, 7},
                               {64, 33, 13},   {9, 257, 64}, {13, 768, 41}, {2, 2049, 11},
                               {64, 130, 1},   {1, 5, 3000}, {65, 100, 37}, {130, 31, 29},
                               {97, 2049, 301}};
  ForEachSimdTarget([&](const std::string&) {
    for (const auto& s : shapes) {
      ExpectMatchesReference(MakeProblem(s[0], s[1], s[2], s[1] * 31 + s[2]));
    }
  });
}

// Large enough that the call runs on threads, with every row-group remainder; 150 rows
// run blocked, their rows alone streaming.
TEST(SmallGemmTest, RowResultsDoNotDependOnTheBatch) {
  ForEachSimdTarget([](const std::string&) {
    for (int32_t in : {257, 768}) {
      const int32_t out = 301, rows = 150;
      const Problem p = MakeProblem(rows, in, out, in);
      const std::vector<float> all = Gemm(p);
      // Every prefix length (different row-group remainders, both paths).
      for (int32_t n = 1; n <= rows; n += (n < 70 ? 1 : 13)) {
        const std::vector<float> part = Gemm(p, n);
        for (size_t i = 0; i < part.size(); ++i) {
          ASSERT_EQ(part[i], all[i]) << "in " << in << " prefix " << n << " index " << i;
        }
      }
      // Every row alone.
      std::vector<float> one(out);
      for (int32_t t = 0; t < rows; ++t) {
        SmallBatchGemm(p.x.data() + static_cast<size_t>(t) * in, 1, in, p.w.data(), out,
                       one.data());
        for (int32_t o = 0; o < out; ++o) {
          ASSERT_EQ(one[o], all[static_cast<size_t>(t) * out + o])
              << "in " << in << " row " << t << " col " << o;
        }
      }
    }
  });
}

TEST(SmallGemmTest, ResultsDoNotDependOnTheThreadCount) {
  const int saved = omp_get_max_threads();
  ForEachSimdTarget([](const std::string&) {
    for (int32_t rows : {1, 7, 64, 200}) {
      const Problem p = MakeProblem(rows, 2049, 301, rows);
      omp_set_num_threads(1);
      const std::vector<float> one = Gemm(p);
      for (int threads : {2, 3}) {
        omp_set_num_threads(threads);
        const std::vector<float> many = Gemm(p);
        for (size_t i = 0; i < one.size(); ++i) {
          ASSERT_EQ(many[i], one[i]) << "rows " << rows << " threads " << threads << " at " << i;
        }
      }
    }
  });
  omp_set_num_threads(saved);
}

// One sum order on every target: those with fused multiply-add agree bitwise, and so do
// x86's SSE4 and portable fallback (a product, then a sum, each rounded).
TEST(SmallGemmTest, TargetsWithTheSameRoundingAgreeBitwise) {
  const Problem p = MakeProblem(70, 2049, 53, 5);
  std::map<std::string, std::pair<std::string, std::vector<float>>> first;  // by rounding
  ForEachSimdTarget([&](const std::string& name) {
    const bool fma = name.rfind("AVX", 0) == 0 || name == "NEON";
#if !defined(__x86_64__)
    if (!fma) return;  // elsewhere the compiler may contract the fallback's mul and add
#endif
    const std::vector<float> y = Gemm(p);
    auto [it, inserted] = first.try_emplace(fma ? "fma" : "mul+add", name, y);
    if (inserted) return;
    for (size_t i = 0; i < y.size(); ++i) {
      ASSERT_EQ(y[i], it->second.second[i]) << name << " vs " << it->second.first << " at " << i;
    }
  });
  // ...and the two roundings differ (the targets really ran).
  if (first.size() == 2) {
    EXPECT_NE(first["fma"].second, first["mul+add"].second);
  }
}

}  // namespace
}  // namespace superpose::engine::cpu
