// The bf16-weight GEMM (engine/cpu/bf16_gemm.h), on every kernel this CPU has (AMX,
// AVX512-BF16, and the widening kernel on every SIMD target): against a double-precision reference
// of the same bf16-rounded operands, for 1..70 activation rows and sizes that are no multiple of
// the 32 x 32 block or the 16-row tile; batch invariance (row r of a many-row call is bitwise equal
// to the same row alone); thread-count invariance; the packed layout.
//
// Tolerance: |y - ref| <= 1e-5 * sum_k |x_k * w_k| over the bf16-rounded operands. Products
// of two bf16 values are exact in float32; the only error is float32 accumulation of at
// most a few hundred terms.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "engine/cpu/bf16_gemm.h"
#include "engine/model/weights.h"
#include "tests/simd_targets.h"

namespace superpose::engine::cpu {
namespace {

std::vector<Bf16Kernel> Kernels() {
  std::vector<Bf16Kernel> out;
  for (Bf16Kernel k : {Bf16Kernel::kAmx, Bf16Kernel::kAvx512Bf16, Bf16Kernel::kWiden}) {
    if (Bf16KernelAvailable(k)) out.push_back(k);
  }
  return out;
}

// fn(kernel) for every kernel here, the widening one once per SIMD target.
template <typename Fn>
void ForEachKernel(Fn&& fn) {
  for (Bf16Kernel k : Kernels()) {
    SCOPED_TRACE(Bf16KernelName(k));
    if (k == Bf16Kernel::kWiden) {
      superpose::testing::ForEachSimdTarget([&](const std::string&) { fn(k); });
    } else {
      fn(k);
    }
  }
}

struct Problem {
  int32_t rows, in, out;
  std::vector<float> x, w;
  PackedBf16 packed;
};

Problem MakeProblem(int32_t rows, int32_t in, int32_t out, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  Problem p{rows,
            in,
            out,
            std::vector<float>(static_cast<size_t>(rows) * in),
            std::vector<float>(static_cast<size_t>(out) * in),
            PackedBf16{}};
  for (float& v : p.x) v = nd(rng);
  for (float& v : p.w) v = nd(rng);
  p.packed.Pack(p.w.data(), out, in);
  return p;
}

float Round(float v) { return Bf16ToF32(F32ToBf16(v)); }

std::vector<float> Multiply(Bf16Kernel kernel, const Problem& p) {
  std::vector<float> y(static_cast<size_t>(p.rows) * p.out, std::nanf(""));
  Bf16GemmWith(kernel, p.x.data(), p.rows, p.packed, y.data());
  return y;
}

void ExpectMatchesReference(Bf16Kernel kernel, const Problem& p) {
  SCOPED_TRACE(Bf16KernelName(kernel));
  const std::vector<float> y = Multiply(kernel, p);
  for (int32_t t = 0; t < p.rows; ++t) {
    for (int32_t o = 0; o < p.out; ++o) {
      double ref = 0, mag = 0;
      for (int32_t k = 0; k < p.in; ++k) {
        const double prod = static_cast<double>(Round(p.x[static_cast<size_t>(t) * p.in + k])) *
                            Round(p.w[static_cast<size_t>(o) * p.in + k]);
        ref += prod;
        mag += std::abs(prod);
      }
      ASSERT_NEAR(y[static_cast<size_t>(t) * p.out + o], ref, 1e-5 * mag)
          << "rows " << p.rows << " in " << p.in << " out " << p.out << " at row " << t << " col "
          << o;
    }
  }
}

TEST(Bf16GemmTest, ReportsKernel) {
  const std::string name = Bf16GemmKernelName();
  if (HasAmxBf16()) {
    EXPECT_EQ(name, "amx");
  } else if (HasAvx512Bf16()) {
    // vdpbf16ps on AMD, the widening kernel on Intel (one-port vdpbf16ps).
    EXPECT_TRUE(name == "avx512_bf16" || name == "widen") << name;
  } else {
    EXPECT_EQ(name, "widen");
  }
  {
    // Capped below AVX-512, never an AVX-512 special case.
    simd::ScopedTarget avx2_or_less(simd::AvailableTargets().back());
    EXPECT_STREQ(Bf16GemmKernelName(), "widen");
  }
  std::printf("kernels here:");
  for (Bf16Kernel k : Kernels()) std::printf(" %s", Bf16KernelName(k));
  std::printf("\n");
}

TEST(Bf16GemmTest, PackRoundsEveryWeightAndPadsWithZeros) {
  const Problem p = MakeProblem(1, 70, 45, 1);
  EXPECT_EQ(p.packed.row_blocks(), 2);
  EXPECT_EQ(p.packed.k_blocks(), 3);
  EXPECT_EQ(p.packed.bytes(), size_t{2} * 3 * 32 * 32 * 2);
  std::vector<float> back(p.w.size());
  p.packed.Unpack(back.data());
  for (size_t i = 0; i < back.size(); ++i) ASSERT_EQ(back[i], Round(p.w[i])) << i;
  // Padding: output rows 45..63 and inputs 70..95 of the blocks are zero.
  for (int32_t r = 45; r < 64; ++r) {
    for (int32_t k = 0; k < 96; ++k) {
      ASSERT_EQ(p.packed.block(r / 32, k / 32)[PackedBf16::Offset(r % 32, k % 32)], 0) << r;
    }
  }
}

TEST(Bf16GemmTest, MatchesReference) {
  ForEachKernel([](Bf16Kernel kernel) {
    for (int32_t rows : {1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 70}) {
      ExpectMatchesReference(kernel, MakeProblem(rows, 96, 64, 10 + rows));
      ExpectMatchesReference(kernel, MakeProblem(rows, 83, 45, 20 + rows));
    }
    ExpectMatchesReference(kernel, MakeProblem(5, 768, 200, 7));
    // More than one weight group (4 blocks of 32 inputs) per row block, with their partial
    // sums kept between groups (the widening kernel, 2 < rows <= 128), and past it.
    for (int32_t rows : {9, 16, 40, 130}) {
      ExpectMatchesReference(kernel, MakeProblem(rows, 300, 70, 30 + rows));
    }
  });
}

TEST(Bf16GemmTest, RowResultsDoNotDependOnTheBatch) {
  ForEachKernel([](Bf16Kernel kernel) {
    // 140 rows: whole-row-block passes; 70: weight groups (the widening kernel), 1: one
    // register tile. Every row's result is bitwise the same in all three.
    const Problem all = MakeProblem(140, 200, 100, 5);
    const std::vector<float> y = Multiply(kernel, all);
    Problem part{70,      all.in,
                 all.out, std::vector<float>(all.x.begin(), all.x.begin() + 70 * all.in),
                 all.w,   PackedBf16{}};
    part.packed.Pack(part.w.data(), part.out, part.in);
    const std::vector<float> y70 = Multiply(kernel, part);
    ASSERT_TRUE(std::equal(y70.begin(), y70.end(), y.begin()));
    for (int32_t t : {0, 15, 16, 33, 69, 139}) {
      Problem one{1,
                  all.in,
                  all.out,
                  std::vector<float>(all.x.begin() + static_cast<size_t>(t) * all.in,
                                     all.x.begin() + static_cast<size_t>(t + 1) * all.in),
                  all.w,
                  PackedBf16{}};
      one.packed.Pack(one.w.data(), one.out, one.in);
      const std::vector<float> y1 = Multiply(kernel, one);
      for (int32_t o = 0; o < all.out; ++o) {
        ASSERT_EQ(y1[o], y[static_cast<size_t>(t) * all.out + o]) << "row " << t << " col " << o;
      }
    }
  });
}

TEST(Bf16GemmTest, ResultsDoNotDependOnThreadCount) {
  const Problem p = MakeProblem(20, 512, 1024, 9);
  const int saved = omp_get_max_threads();
  ForEachKernel([&](Bf16Kernel kernel) {
    omp_set_num_threads(1);
    const std::vector<float> one = Multiply(kernel, p);
    omp_set_num_threads(std::max(2, saved));
    const std::vector<float> many = Multiply(kernel, p);
    omp_set_num_threads(saved);
    EXPECT_EQ(one, many);
  });
}

TEST(Bf16GemmTest, KernelsAgreeWithinTolerance) {
  // The kernels add the same products in about the same order; hardware may round the
  // pair sums differently, so this allows a float32 accumulation error.
  const Problem p = MakeProblem(17, 300, 70, 11);
  std::vector<float> b;
  {
    // The reference: the widening kernel on the portable target.
    simd::ScopedTarget portable(simd::AvailableTargets().back());
    b = Multiply(Bf16Kernel::kWiden, p);
  }
  ForEachKernel([&](Bf16Kernel kernel) {
    const std::vector<float> a = Multiply(kernel, p);
    for (size_t i = 0; i < a.size(); ++i) {
      ASSERT_NEAR(a[i], b[i], 1e-4f * (1 + std::abs(b[i]))) << i;
    }
  });
}

}  // namespace
}  // namespace superpose::engine::cpu
