// The quantizers (engine/model/quantize.h) and the dequantizing GEMM
// (engine/cpu/quant_gemm.h), on every SIMD target this CPU supports:
//  - the SIMD dequantization equals the one definition (DequantizeRows) bitwise;
//  - QuantGemm against a double-precision reference over the dequantized weights, with
//    |y - ref| <= 1e-5 * sum_k |x_k * w_k| (fp32 accumulation in 16 lane-wise partial sums
//    over at most a few hundred products stays well inside that), and bitwise equal to
//    SmallBatchGemm on the dequantized matrix (the same dot products);
//  - batch invariance: row r of a many-row call equals the row computed alone, bitwise,
//    also at another thread count;
//  - fused and column-split blocks (tensor parallelism), the q4 split check;
//  - the quantizers: int8 error within half a step, k-means reproducible and exact on
//    data with 16 distinct values, every q4 code the nearest table entry.
#include <gtest/gtest.h>

#include <omp.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "engine/cpu/quant_gemm.h"
#include "engine/cpu/small_gemm.h"
#include "engine/model/quantize.h"
#include "tests/simd_targets.h"

namespace superpose::engine::cpu {
namespace {

using superpose::testing::ForEachSimdTarget;

std::vector<float> Random(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = nd(rng);
  return v;
}

QuantMatrix Whole(const QuantizedTensor& t) {
  QuantMatrix m;
  EXPECT_TRUE(m.AppendBlock(t, 0, t.rows, 0, t.cols).ok());
  return m;
}

std::vector<float> Dequantized(const QuantizedTensor& t) {
  std::vector<float> w(static_cast<size_t>(t.rows * t.cols));
  DequantizeRows(t, 0, t.rows, w.data());
  return w;
}

std::vector<float> RunGemm(const QuantMatrix& m, const std::vector<float>& x, int32_t rows) {
  std::vector<float> y(static_cast<size_t>(rows) * m.out, std::nanf(""));
  QuantGemm(x.data(), rows, m, y.data());
  return y;
}

struct Shape {
  int32_t rows, in, out;
};
const Shape kShapes[] = {{1, 16, 1},   {1, 172, 64}, {3, 37, 33},  {7, 64, 130},
                         {16, 200, 9}, {64, 96, 70}, {65, 48, 17}, {130, 33, 40}};

void CheckOne(WeightQuant kind, const Shape& s, uint32_t seed) {
  SCOPED_TRACE(std::string(WeightQuantName(kind)) + " rows=" + std::to_string(s.rows) +
               " in=" + std::to_string(s.in) + " out=" + std::to_string(s.out));
  const std::vector<float> wf = Random(static_cast<size_t>(s.out) * s.in, seed, 0.05f);
  const std::vector<float> x = Random(static_cast<size_t>(s.rows) * s.in, seed + 1);
  const QuantizedTensor t = Quantize(kind, wf.data(), s.out, s.in);
  const QuantMatrix m = Whole(t);
  const std::vector<float> w = Dequantized(t);
  // The SIMD dequantization is the definition.
  std::vector<float> simd(w.size());
  DequantizeQuantRows(m, 0, s.out, simd.data(), s.in);
  ASSERT_EQ(simd, w);
  const std::vector<float> y = RunGemm(m, x, s.rows);
  std::vector<float> dense(y.size());
  SmallBatchGemm(x.data(), s.rows, s.in, w.data(), s.out, dense.data());
  EXPECT_EQ(y, dense);
  for (int32_t r = 0; r < s.rows; ++r) {
    for (int32_t o = 0; o < s.out; ++o) {
      double ref = 0, mag = 0;
      for (int32_t k = 0; k < s.in; ++k) {
        const double p = static_cast<double>(x[static_cast<size_t>(r) * s.in + k]) *
                         w[static_cast<size_t>(o) * s.in + k];
        ref += p;
        mag += std::abs(p);
      }
      ASSERT_NEAR(y[static_cast<size_t>(r) * s.out + o], ref, 1e-5 * mag + 1e-30)
          << "row " << r << " out " << o;
    }
  }
  // Batch invariance: each row alone.
  for (int32_t r = 0; r < s.rows; r += std::max(1, s.rows / 5)) {
    const std::vector<float> xr(x.begin() + static_cast<size_t>(r) * s.in,
                                x.begin() + static_cast<size_t>(r + 1) * s.in);
    const std::vector<float> alone = RunGemm(m, xr, 1);
    for (int32_t o = 0; o < s.out; ++o) {
      ASSERT_EQ(alone[o], y[static_cast<size_t>(r) * s.out + o]) << "row " << r;
    }
  }
}

TEST(QuantGemm, MatchesReferenceOnEveryTarget) {
  ForEachSimdTarget([](const std::string& target) {
    uint32_t seed = 1;
    for (const Shape& s : kShapes) {
      CheckOne(WeightQuant::kInt8, s, seed++);
      CheckOne(WeightQuant::kQ4, s, seed++);
    }
  });
}

TEST(QuantGemm, ThreadCountDoesNotChangeResults) {
  const std::vector<float> wf = Random(512 * 160, 7, 0.05f);
  const std::vector<float> x = Random(9 * 160, 8);
  for (WeightQuant kind : {WeightQuant::kInt8, WeightQuant::kQ4}) {
    const QuantMatrix m = Whole(Quantize(kind, wf.data(), 512, 160));
    const int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    const std::vector<float> one = RunGemm(m, x, 9);
    omp_set_num_threads(3);
    const std::vector<float> three = RunGemm(m, x, 9);
    omp_set_num_threads(saved);
    EXPECT_EQ(one, three) << WeightQuantName(kind);
  }
}

// Two tensors fused by rows (the backend's q/k/v), each keeping its own q4 tables, and a
// column block starting at 16 (a tensor-parallel rank of o_proj / down_proj).
TEST(QuantGemm, FusedAndColumnBlocks) {
  const int32_t in = 50;
  const std::vector<float> a = Random(20 * in, 11, 0.05f), b = Random(12 * in, 12, 1.0f);
  for (WeightQuant kind : {WeightQuant::kInt8, WeightQuant::kQ4}) {
    SCOPED_TRACE(WeightQuantName(kind));
    const QuantizedTensor ta = Quantize(kind, a.data(), 20, in);
    const QuantizedTensor tb = Quantize(kind, b.data(), 12, in);
    QuantMatrix fused;
    ASSERT_TRUE(fused.AppendBlock(ta, 0, 20, 0, in).ok());
    ASSERT_TRUE(fused.AppendBlock(tb, 4, 12, 0, in).ok());
    ASSERT_EQ(fused.out, 28);
    std::vector<float> got(static_cast<size_t>(28) * in), want(got.size());
    DequantizeQuantRows(fused, 0, 28, got.data(), in);
    DequantizeRows(ta, 0, 20, want.data());
    DequantizeRows(tb, 4, 12, want.data() + 20 * in);
    EXPECT_EQ(got, want);

    QuantMatrix cols;
    ASSERT_TRUE(cols.AppendBlock(tb, 0, 12, 16, in).ok());
    ASSERT_EQ(cols.in, in - 16);
    std::vector<float> part(static_cast<size_t>(12) * (in - 16));
    DequantizeQuantRows(cols, 0, 12, part.data(), in - 16);
    const std::vector<float> full = Dequantized(tb);
    for (int32_t r = 0; r < 12; ++r) {
      for (int32_t c = 16; c < in; ++c) {
        ASSERT_EQ(part[static_cast<size_t>(r) * (in - 16) + c - 16],
                  full[static_cast<size_t>(r) * in + c]);
      }
    }
  }
  QuantMatrix bad;
  const QuantizedTensor q4 = PalettizeQ4(a.data(), 20, in);
  const absl::Status s = bad.AppendBlock(q4, 0, 20, 8, in);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("multiple of 16"), std::string::npos) << s;
}

TEST(Quantize, Int8WithinHalfAStep) {
  const std::vector<float> w = Random(33 * 70, 3);
  const QuantizedTensor t = QuantizeInt8(w.data(), 33, 70);
  const std::vector<float> d = Dequantized(t);
  for (int32_t r = 0; r < 33; ++r) {
    float amax = 0;
    for (int32_t c = 0; c < 70; ++c) amax = std::max(amax, std::abs(w[r * 70 + c]));
    EXPECT_FLOAT_EQ(t.scales[r], amax / 127.0f);
    for (int32_t c = 0; c < 70; ++c) {
      EXPECT_LE(std::abs(d[r * 70 + c] - w[r * 70 + c]), 0.5f * t.scales[r] * 1.0001f);
    }
  }
  const std::vector<float> zeros(10, 0.0f);
  const QuantizedTensor z = QuantizeInt8(zeros.data(), 1, 10);
  EXPECT_EQ(z.scales[0], 0.0f);
  EXPECT_EQ(Dequantized(z), zeros);
}

TEST(Quantize, Q4IsReproducibleNearestAndExactOnSixteenLevels) {
  const std::vector<float> w = Random(40 * 37, 5, 0.02f);
  const QuantizedTensor a = PalettizeQ4(w.data(), 40, 37), b = PalettizeQ4(w.data(), 40, 37);
  EXPECT_EQ(a.codes, b.codes);
  EXPECT_EQ(a.lut, b.lut);
  ASSERT_EQ(a.codes.size(), static_cast<size_t>(40 * Q4RowBytes(37)));
  ASSERT_EQ(a.lut.size(), static_cast<size_t>(Q4Groups(37) * 16));
  const std::vector<float> d = Dequantized(a);
  for (int32_t r = 0; r < 40; ++r) {
    for (int32_t c = 0; c < 37; ++c) {
      const float v = w[r * 37 + c], got = std::abs(d[r * 37 + c] - v);
      for (int32_t i = 0; i < 16; ++i) {
        EXPECT_LE(got, std::abs(F16ToF32(a.lut[(c / 16) * 16 + i]) - v)) << r << "," << c;
      }
    }
  }
  // Data with 16 distinct float16 values (every one used) is reproduced exactly.
  std::vector<float> levels(64 * 16);
  for (size_t i = 0; i < levels.size(); ++i) levels[i] = static_cast<float>((i * 7) % 16) - 7.5f;
  const QuantizedTensor e = PalettizeQ4(levels.data(), 64, 16);
  EXPECT_EQ(Dequantized(e), levels);
}

}  // namespace
}  // namespace superpose::engine::cpu
