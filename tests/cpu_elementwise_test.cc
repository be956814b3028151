// The CPU backend's element-wise ops (engine/cpu/elementwise.h) on every SIMD target the
// CPU has (tests/simd_targets.h): against a double-precision reference, rows of lengths
// that leave every kind of tail (full vectors, 4-lane and 1-lane remainders), and a row's
// result bitwise the same wherever it sits (alone, or at any offset and alignment of a
// bigger buffer, as rows of a batch are).
// Tolerances, float32 rounding: RmsNorm 2e-6 relative to the row's largest |reference|
// value (measured up to 8192 values: <= 2e-7 on vector targets, 9e-7 on SCALAR, whose
// sum of squares runs in two chains), RoPE 1e-6 of the largest |value| (measured < 1e-7),
// SwiGLU 2e-6 relative to each value (measured 1.8e-7).
#include "engine/cpu/elementwise.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "tests/simd_targets.h"

namespace superpose {
namespace {

using engine::cpu::RmsNorm;
using engine::cpu::Rope;
using engine::cpu::SwiGlu;

const int32_t kLengths[] = {1, 2, 3, 4, 5, 8, 15, 16, 17, 24, 37, 64, 100, 768, 2051};

std::vector<float> Random(size_t n, float scale, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = nd(rng);
  return v;
}

double MaxAbs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

bool SameBits(const float* a, const float* b, size_t n) {
  return std::memcmp(a, b, n * sizeof(float)) == 0;
}

TEST(CpuElementwise, RmsNormMatchesDoubleReference) {
  testing::ForEachSimdTarget([](const std::string& target) {
    for (int32_t n : kLengths) {
      const std::vector<float> x = Random(n, 3.0f, n), w = Random(n, 1.0f, n + 1);
      const float eps = 1e-5f;
      std::vector<float> y(n);
      RmsNorm(x.data(), w.data(), n, eps, y.data());
      double ss = 0;
      for (float v : x) ss += static_cast<double>(v) * v;
      const double inv = 1.0 / std::sqrt(ss / n + eps);
      std::vector<double> want(n);
      for (int32_t i = 0; i < n; ++i) want[i] = x[i] * inv * w[i];
      const double tol = 2e-6 * MaxAbs(want);
      for (int32_t i = 0; i < n; ++i) {
        ASSERT_NEAR(y[i], want[i], tol) << target << " n " << n << " i " << i;
      }
      // In place (the backend normalizes q and k heads in place): the same bits.
      std::vector<float> z = x;
      RmsNorm(z.data(), w.data(), n, eps, z.data());
      EXPECT_TRUE(SameBits(y.data(), z.data(), n)) << target << " n " << n;
    }
  });
}

TEST(CpuElementwise, RopeMatchesDoubleReference) {
  testing::ForEachSimdTarget([](const std::string& target) {
    for (int32_t half : kLengths) {
      const int32_t dim = 2 * half;
      const std::vector<float> x = Random(dim, 2.0f, dim);
      std::vector<float> cos(half), sin(half);
      for (int32_t i = 0; i < half; ++i) {
        const float a = 37.0f * std::pow(10000.0f, -static_cast<float>(i) / half);
        cos[i] = std::cos(a);
        sin[i] = std::sin(a);
      }
      std::vector<float> y = x;
      Rope(y.data(), cos.data(), sin.data(), dim);
      std::vector<double> want(dim);
      for (int32_t i = 0; i < half; ++i) {
        const double a = x[i], b = x[i + half];
        want[i] = a * cos[i] - b * sin[i];
        want[i + half] = b * cos[i] + a * sin[i];
      }
      const double tol = 1e-6 * MaxAbs(want);
      for (int32_t i = 0; i < dim; ++i) {
        ASSERT_NEAR(y[i], want[i], tol) << target << " dim " << dim << " i " << i;
      }
    }
  });
}

TEST(CpuElementwise, SwiGluMatchesDoubleReference) {
  testing::ForEachSimdTarget([](const std::string& target) {
    for (int32_t n : kLengths) {
      std::vector<float> g = Random(n, 6.0f, n), u = Random(n, 1.0f, n + 1);
      // Where exp(-g) under- and overflows.
      const float edges[] = {0.0f, -87.0f, -88.5f, -90.0f, -105.0f, -300.0f, 89.0f, 300.0f};
      for (size_t i = 0; i < std::size(edges) && i < g.size(); ++i) g[i] = edges[i];
      std::vector<float> a(n);
      SwiGlu(g.data(), u.data(), n, a.data());
      for (int32_t i = 0; i < n; ++i) {
        const double want = g[i] / (1.0 + std::exp(-static_cast<double>(g[i]))) * u[i];
        ASSERT_NEAR(a[i], want, 2e-6 * std::abs(want) + 1e-30)
            << target << " n " << n << " g " << g[i];
      }
    }
  });
}

// Rows of a batch at every offset (so every alignment) of one buffer give the bits the
// row gives alone.
TEST(CpuElementwise, RowResultDoesNotDependOnItsPlaceInTheBatch) {
  testing::ForEachSimdTarget([](const std::string& target) {
    for (int32_t n : {24, 37, 768}) {
      const int32_t rows = 5, stride = n + 3;  // odd stride: rows start misaligned
      const std::vector<float> x = Random(static_cast<size_t>(rows) * stride, 2.0f, 9);
      const std::vector<float> w = Random(n, 1.0f, 10), u = Random(stride * rows, 1.0f, 11);
      constexpr int32_t half = 12;  // RoPE on the first 24 floats of the row
      const std::vector<float> cs = Random(half, 0.7f, 12), sn = Random(half, 0.7f, 13);
      std::vector<float> norm(x.size()), act(x.size()), rot = x;
      for (int32_t r = 0; r < rows; ++r) {
        const size_t o = static_cast<size_t>(r) * stride;
        RmsNorm(&x[o], w.data(), n, 1e-6f, &norm[o]);
        SwiGlu(&x[o], &u[o], n, &act[o]);
        Rope(&rot[o], cs.data(), sn.data(), 2 * half);
      }
      for (int32_t r = 0; r < rows; ++r) {
        const size_t o = static_cast<size_t>(r) * stride;
        std::vector<float> xr(x.begin() + o, x.begin() + o + n),
            ur(u.begin() + o, u.begin() + o + n);
        std::vector<float> y(n), a(n), z = xr;
        RmsNorm(xr.data(), w.data(), n, 1e-6f, y.data());
        SwiGlu(xr.data(), ur.data(), n, a.data());
        Rope(z.data(), cs.data(), sn.data(), 2 * half);
        EXPECT_TRUE(SameBits(y.data(), &norm[o], n)) << target << " RmsNorm row " << r;
        EXPECT_TRUE(SameBits(a.data(), &act[o], n)) << target << " SwiGlu row " << r;
        EXPECT_TRUE(SameBits(z.data(), &rot[o], n)) << target << " Rope row " << r;
      }
    }
  });
}

}  // namespace
}  // namespace superpose
