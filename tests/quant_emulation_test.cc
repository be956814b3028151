// The CUDA dequantizing GEMM's bodies (cuda/quant_body.h) run on CPU threads: one
// std::thread per lane of a warp and a barrier per step of the xor-shuffle butterfly
// (the device's __shfl_xor_sync). Matrices come from engine::QuantizeInt8 /
// engine::PalettizeQ4 and engine::cpu::QuantMatrix (the layout the backend uploads,
// with fused q/k/v table sets and a rank's column block), so the kernels' indexing is
// checked on any machine against:
//  - engine::DequantizeRows: QuantWeight equals it bit for bit, and the prefill path's
//    bf16 scratch (QuantDequantBf16) equals engine::F32ToBf16 of it;
//  - a float64 reference y = sum_c W'[r, c] x[t, c] (x bf16): the streaming body's
//    float32 sums (a lane's sequential sum of about cols / 32 products, then 5
//    butterfly adds) are within (cols / 32 + 8) * 2^-24 * sum_c |W'[r, c] x[t, c]|,
//    with byte-wise loads and, where the shape allows, the wide loads (which must give
//    bitwise the same sums here);
//  - the prefill path (bf16 W' then a float32 GEMM) within 2^-8 * sum |W' x| of it
//    (one rounding of 2^-9 relative per weight, plus accumulation).
// The GPU test (cuda_quant_test) runs the same bodies as kernels.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/quant_body.h"
#include "engine/cpu/quant_gemm.h"
#include "engine/model/quantize.h"
#include "engine/model/weights.h"
#include "tests/block_emulation.h"
#include "tests/quant_reference.h"

namespace superpose {
namespace {

using engine::WeightQuant;

// One lane of an emulated warp: sum() is the device's butterfly of xor shuffles.
struct LaneCtx : testing::BlockCtx {
  float* slots = nullptr;  // [32][N], shared by the warp
  int lane() const { return t; }
  template <int N>
  void sum(float (&v)[N]) const {
    for (int o = cuda::kQuantWarp / 2; o > 0; o >>= 1) {
      for (int i = 0; i < N; ++i) slots[t * N + i] = v[i];
      sync();
      for (int i = 0; i < N; ++i) v[i] += slots[(t ^ o) * N + i];
      sync();
    }
  }
};

// A QuantMatrix and the host copies the backend uploads (cuda/cuda_quant.cc): tables as
// float16 bits.
struct HostQuant {
  engine::cpu::QuantMatrix m;
  std::vector<uint16_t> lut;
  std::vector<float> dequant;  // [out, in], engine::DequantizeRows of the blocks

  // Wide loads where the shape allows them (the host's loads are memcpy: any alignment).
  bool CanVectorize() const {
    return m.kind == WeightQuant::kInt8 ? m.in % 4 == 0 : m.in % engine::kQ4GroupSize == 0;
  }
  cuda::QuantView View(bool vec = false) const {
    cuda::QuantView v;
    v.vec = vec ? 1 : 0;
    v.kind = m.kind == WeightQuant::kInt8 ? cuda::kQuantInt8 : cuda::kQuantQ4;
    v.out = m.out;
    v.in = m.in;
    v.groups = static_cast<int32_t>(engine::Q4Groups(m.in));
    v.row_bytes = m.row_bytes();
    v.codes = m.codes.data();
    v.scales = m.scales.data();
    v.lut = lut.data();
    v.lut_set = m.lut_set.data();
    return v;
  }
};

std::vector<float> Uniform(size_t n, uint32_t seed, float a) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-a, a);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

// Appends rows [r0, r1) x columns [c0, c1) of a fresh random tensor [rows, cols].
void AppendTensor(WeightQuant kind, int64_t rows, int64_t cols, int64_t r0, int64_t r1, int64_t c0,
                  int64_t c1, uint32_t seed, HostQuant* q) {
  const std::vector<float> w = Uniform(static_cast<size_t>(rows * cols), seed, 0.5f);
  const engine::QuantizedTensor t = engine::Quantize(kind, w.data(), rows, cols);
  ASSERT_TRUE(q->m.AppendBlock(t, r0, r1, c0, c1).ok());
  std::vector<float> d(static_cast<size_t>(rows * cols));
  engine::DequantizeRows(t, 0, rows, d.data());
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t c = c0; c < c1; ++c) q->dequant.push_back(d[r * cols + c]);
  }
  q->lut.clear();
  for (float e : q->m.lut) q->lut.push_back(engine::F32ToF16(e));
}

std::vector<uint16_t> Activations(int32_t T, int32_t in, uint32_t seed) {
  const std::vector<float> f = Uniform(static_cast<size_t>(T) * in, seed, 1.0f);
  std::vector<uint16_t> x(f.size());
  for (size_t i = 0; i < f.size(); ++i) x[i] = engine::F32ToBf16(f[i]);
  return x;
}

// y[t, r] by the streaming body: one warp, rows r in turn, token tiles of kMaxT.
template <int kMaxT>
std::vector<float> EmulateGemv(const cuda::QuantView& v, const std::vector<uint16_t>& x,
                               int32_t T) {
  std::vector<float> y(static_cast<size_t>(T) * v.out, std::nanf(""));
  std::vector<float> slots(cuda::kQuantWarp * kMaxT, std::nanf(""));
  testing::RunBlock<LaneCtx>(cuda::kQuantWarp, [&](LaneCtx& c) {
    c.slots = slots.data();
    for (int32_t t0 = 0; t0 < T; t0 += kMaxT) {
      const int32_t nt = T - t0 < kMaxT ? T - t0 : kMaxT;
      for (int32_t r = 0; r < v.out; ++r) {
        cuda::QuantGemvWarp<kMaxT>(c, v, x.data(), t0, nt, r, y.data());
      }
    }
  });
  return y;
}

// Checks y (any path) against the float64 reference within tol_factor * sum |W' x|.
void CheckAgainstReference(const HostQuant& q, const std::vector<uint16_t>& x, int32_t T,
                           const std::vector<float>& y, double tol_factor,
                           const std::string& what) {
  testing::ExpectNearQuantReference(q.dequant, q.m.out, q.m.in, x, T, y, tol_factor, what);
}

void CheckWeights(const HostQuant& q) {
  const cuda::QuantView v = q.View();
  for (int32_t r = 0; r < v.out; ++r) {
    for (int32_t c = 0; c < v.in; ++c) {
      const float want = q.dequant[static_cast<size_t>(r) * v.in + c];
      ASSERT_EQ(cuda::QuantWeight(v, r, c), want) << "r=" << r << " c=" << c;
      ASSERT_EQ(cuda::QuantDequantBf16(v, r, c), engine::F32ToBf16(want)) << "r=" << r;
    }
  }
}

// The prefill path: bf16 rows of W' (QuantDequantBf16), a float32 GEMM (cuBLAS's role).
std::vector<float> PrefillPath(const HostQuant& q, const std::vector<uint16_t>& x, int32_t T) {
  const cuda::QuantView v = q.View();
  std::vector<float> y(static_cast<size_t>(T) * v.out);
  for (int32_t t = 0; t < T; ++t) {
    for (int32_t r = 0; r < v.out; ++r) {
      float s = 0.0f;
      for (int32_t c = 0; c < v.in; ++c) {
        s += engine::Bf16ToF32(cuda::QuantDequantBf16(v, r, c)) *
             engine::Bf16ToF32(x[static_cast<size_t>(t) * v.in + c]);
      }
      y[static_cast<size_t>(t) * v.out + r] = s;
    }
  }
  return y;
}

void CheckAllPaths(const HostQuant& q, const std::string& what) {
  SCOPED_TRACE(what);
  CheckWeights(q);
  const double tol = (q.m.in / 32.0 + 8.0) * std::ldexp(1.0, -24);
  for (int32_t T : {1, 3, 17}) {
    const std::vector<uint16_t> x = Activations(T, q.m.in, 100 + T);
    const std::string w = what + " T=" + std::to_string(T);
    const std::vector<float> y16 = EmulateGemv<cuda::kQuantStreamMaxT>(q.View(), x, T);
    CheckAgainstReference(q, x, T, EmulateGemv<1>(q.View(), x, T), tol, w + " tile 1");
    CheckAgainstReference(q, x, T, EmulateGemv<4>(q.View(), x, T), tol, w + " tile 4");
    CheckAgainstReference(q, x, T, y16, tol, w + " tile 16");
    if (q.CanVectorize()) {  // wide loads: the same sums in the same order, bitwise
      EXPECT_EQ(EmulateGemv<cuda::kQuantStreamMaxT>(q.View(true), x, T), y16) << w << " wide";
      CheckAgainstReference(q, x, T, EmulateGemv<1>(q.View(true), x, T), tol, w + " wide tile 1");
    }
    CheckAgainstReference(q, x, T, PrefillPath(q, x, T), std::ldexp(1.0, -8), w + " prefill");
  }
}

class QuantEmulationTest : public ::testing::TestWithParam<WeightQuant> {};

TEST_P(QuantEmulationTest, WholeMatricesOfSeveralShapes) {
  const WeightQuant kind = GetParam();
  // cols: one group, not a multiple of 16 (one short group, several groups and a short
  // last one), more columns than a warp's pass (128 int8 bytes, 32 q4 groups = 512).
  // Wide loads: int8 at 16, 100, 528 columns; q4 at 16 and 528 (33 groups: lanes wrap).
  const int32_t shapes[][2] = {{5, 16}, {3, 7}, {7, 100}, {33, 45}, {9, 530}, {6, 528}};
  uint32_t seed = 1;
  for (const auto& s : shapes) {
    HostQuant q;
    AppendTensor(kind, s[0], s[1], 0, s[0], 0, s[1], seed++, &q);
    CheckAllPaths(q, std::string(engine::WeightQuantName(kind)) + " " + std::to_string(s[0]) + "x" +
                         std::to_string(s[1]));
  }
}

// q/k/v fused (three tensors: three table sets) and row-parallel ranks' column blocks
// (columns [32, 64) and the last rank's [64, 90) of 90: starting on a group boundary,
// the last one ending at cols, inside a group).
TEST_P(QuantEmulationTest, FusedTensorsAndRankBlocks) {
  const WeightQuant kind = GetParam();
  HostQuant qkv;
  AppendTensor(kind, 12, 40, 4, 8, 0, 40, 11, &qkv);  // q rows of rank 1 of 3
  AppendTensor(kind, 6, 40, 2, 4, 0, 40, 12, &qkv);   // k
  AppendTensor(kind, 6, 40, 2, 4, 0, 40, 13, &qkv);   // v
  ASSERT_EQ(qkv.m.out, 8);
  if (kind == WeightQuant::kQ4) {
    ASSERT_EQ(qkv.m.lut.size(), 3u * engine::Q4Groups(40) * 16);
    EXPECT_EQ(qkv.m.lut_set, (std::vector<int32_t>{0, 0, 0, 0, 1, 1, 2, 2}));
  }
  CheckAllPaths(qkv, std::string(engine::WeightQuantName(kind)) + " fused qkv");
  HostQuant last_rank;
  AppendTensor(kind, 10, 90, 0, 10, 64, 90, 14, &last_rank);
  CheckAllPaths(last_rank, std::string(engine::WeightQuantName(kind)) + " o columns [64, 90)");
  HostQuant middle;
  AppendTensor(kind, 10, 90, 0, 10, 32, 64, 15, &middle);
  CheckAllPaths(middle, std::string(engine::WeightQuantName(kind)) + " o columns [32, 64)");
}

INSTANTIATE_TEST_SUITE_P(Formats, QuantEmulationTest,
                         ::testing::Values(WeightQuant::kInt8, WeightQuant::kQ4),
                         [](const ::testing::TestParamInfo<WeightQuant>& i) {
                           return std::string(engine::WeightQuantName(i.param));
                         });

TEST(QuantEmulationConversions, HalfAndBf16MatchTheEngine) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float got = cuda::QuantHalfToFloat(static_cast<uint16_t>(h));
    const float want = engine::F16ToF32(static_cast<uint16_t>(h));
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << h;
    } else {
      ASSERT_EQ(got, want) << h;
      ASSERT_EQ(std::signbit(got), std::signbit(want)) << h;
    }
  }
  std::mt19937 rng(7);
  for (int i = 0; i < 200000; ++i) {
    const uint32_t bits = rng();
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    ASSERT_EQ(cuda::QuantFloatToBf16(f), engine::F32ToBf16(f)) << bits;
  }
}

}  // namespace
}  // namespace superpose
