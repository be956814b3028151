// The segmented LoRA kernels' bodies (cuda/lora_body.h) and segment table
// (cuda/lora_segments.h), run on CPU threads (one std::thread per CUDA thread of a
// block, a barrier for __syncthreads) over the grids cuda/lora_kernels.cu launches,
// against a float64 reference: several segments (long ones cut, consecutive rows of one
// adapter joined), ranks 8, 16 and 32 and a site's modules at their output offsets,
// rows with and without an adapter (untouched), a module a site does not adapt.
//
// Tolerance: float32 sums of products of values in [-1, 1]: the shrink's n = in terms,
// then the expand's rank terms, each within ~n * 2^-24 * sum|terms|; checked at
// 1e-5 * (sum_k |u_k b_kj| * scale + |y0|) + 1e-6 with u's own error folded in
// (sum_i |x_i a_ki| bounds it).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "cuda/lora_body.h"
#include "cuda/lora_segments.h"
#include "tests/block_emulation.h"

namespace superpose {
namespace {

using cuda::LoraDesc;

struct HostCtx : testing::BlockCtx {
  float load(const float* p, size_t i) const { return p[i]; }
};

std::vector<float> Uniform(size_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

// A site of one layer with `outs.size()` modules (offsets consecutive in y).
struct Module {
  int32_t rank, in, out, offset;
  float scale;
  std::vector<float> a, bt;
};
struct Adapter {
  std::vector<Module> mods;           // slots of site `kSite` at layer `kLayer`
  std::vector<LoraDesc<float>> desc;  // [layers][sites][slots]
};

constexpr int32_t kLayers = 2, kLayer = 1, kSite = 0;

Adapter MakeAdapter(int32_t rank, int32_t in, const std::vector<int32_t>& outs,
                    const std::vector<bool>& adapted, float scale, std::mt19937& rng) {
  Adapter ad;
  ad.desc.resize(cuda::LoraDescIndex(kLayers, 0, 0));
  int32_t offset = 0;
  for (size_t m = 0; m < outs.size(); ++m) {
    Module mod{rank,
               in,
               outs[m],
               offset,
               scale,
               Uniform(static_cast<size_t>(rank) * in, rng),
               Uniform(static_cast<size_t>(rank) * outs[m], rng)};
    offset += outs[m];
    if (!adapted[m]) mod.rank = 0;
    ad.mods.push_back(std::move(mod));
  }
  for (size_t m = 0; m < ad.mods.size(); ++m) {
    const Module& mod = ad.mods[m];
    LoraDesc<float>& d = ad.desc[cuda::LoraDescIndex(kLayer, kSite, static_cast<int32_t>(m))];
    if (mod.rank == 0) continue;
    d = {mod.a.data(), mod.bt.data(), mod.rank, mod.in, mod.out, mod.offset, mod.scale, 0};
  }
  return ad;
}

// Runs the shrink grid (segments x slots) then the expand grid (x column tiles).
void Emulate(const std::vector<int32_t>& segs, int32_t num_segs, int32_t slots,
             const std::vector<float>& x, int32_t in, std::vector<float>* y, int32_t y_width,
             int32_t T) {
  std::vector<float> u(static_cast<size_t>(T) * cuda::kLoraUWidth, std::nanf(""));
  std::vector<float> smem(cuda::kLoraThreads);
  const int n = cuda::kLoraThreads;
  for (int32_t s = 0; s < num_segs; ++s) {
    const int32_t* seg = segs.data() + s * cuda::kLoraSegmentWords;
    for (int32_t slot = 0; slot < slots; ++slot) {
      std::fill(smem.begin(), smem.end(), std::nanf(""));
      testing::RunBlock<HostCtx>(n, [&](HostCtx& c) {
        cuda::LoraShrinkBlock<float>(c, seg, kLayer, kSite, slot, x.data(), in, smem.data(),
                                     u.data());
      });
    }
  }
  const int32_t tiles = (y_width + n - 1) / n;
  for (int32_t s = 0; s < num_segs; ++s) {
    const int32_t* seg = segs.data() + s * cuda::kLoraSegmentWords;
    for (int32_t slot = 0; slot < slots; ++slot) {
      for (int32_t tile = 0; tile < tiles; ++tile) {
        testing::RunBlock<HostCtx>(n, [&](HostCtx& c) {
          cuda::LoraExpandBlock<float>(c, seg, kLayer, kSite, slot, tile, u.data(), y->data(),
                                       y_width);
        });
      }
    }
  }
}

// The float64 reference of one row: y0 + scale * B (A x) per adapted module, and a bound
// on the float32 error.
void Reference(const Adapter& ad, const float* x, const float* y0, int32_t y_width,
               std::vector<double>* want, std::vector<double>* tol) {
  want->assign(y0, y0 + y_width);
  tol->assign(y_width, 0.0);
  for (int32_t j = 0; j < y_width; ++j) (*tol)[j] = 1e-5 * std::abs(y0[j]) + 1e-6;
  for (const Module& m : ad.mods) {
    if (m.rank == 0) continue;
    std::vector<double> u(m.rank), umag(m.rank);
    for (int32_t k = 0; k < m.rank; ++k) {
      for (int32_t i = 0; i < m.in; ++i) {
        u[k] += double{x[i]} * m.a[static_cast<size_t>(k) * m.in + i];
        umag[k] += std::abs(double{x[i]} * m.a[static_cast<size_t>(k) * m.in + i]);
      }
    }
    for (int32_t j = 0; j < m.out; ++j) {
      double acc = 0.0, mag = 0.0;
      for (int32_t k = 0; k < m.rank; ++k) {
        const double b = m.bt[static_cast<size_t>(k) * m.out + j];
        acc += u[k] * b;
        mag += umag[k] * std::abs(b);
      }
      (*want)[m.offset + j] += m.scale * acc;
      (*tol)[m.offset + j] += 1e-5 * m.scale * mag;
    }
  }
}

struct SeqSpec {
  int32_t count;
  int32_t adapter;  // index into the adapters, -1: none
};

void RunCase(const std::vector<int32_t>& ranks, const std::vector<SeqSpec>& seqs, int32_t in,
             const std::vector<int32_t>& outs, const std::vector<bool>& adapted, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<Adapter> ads;
  for (size_t i = 0; i < ranks.size(); ++i) {
    ads.push_back(MakeAdapter(ranks[i], in, outs, adapted, 0.5f + 0.25f * i, rng));
  }
  std::vector<cuda::LoraSeqRows> rows;
  int32_t T = 0;
  for (const SeqSpec& s : seqs) {
    rows.push_back({T, s.count, s.adapter < 0 ? nullptr : ads[s.adapter].desc.data()});
    T += s.count;
  }
  int32_t y_width = 0;
  for (int32_t o : outs) y_width += o;
  const std::vector<float> x = Uniform(static_cast<size_t>(T) * in, rng);
  const std::vector<float> y0 = Uniform(static_cast<size_t>(T) * y_width, rng);
  std::vector<int32_t> segs = {-7};  // the table follows other words
  const int32_t num_segs = cuda::AppendLoraSegments(rows, &segs);
  segs.erase(segs.begin());
  for (int32_t s = 0; s < num_segs; ++s) {
    const int32_t* seg = segs.data() + s * cuda::kLoraSegmentWords;
    ASSERT_LT(seg[0], seg[1]);
    ASSERT_LE(seg[1] - seg[0], cuda::kLoraSegmentRows);
  }
  std::vector<float> y = y0;
  Emulate(segs, num_segs, static_cast<int32_t>(outs.size()), x, in, &y, y_width, T);
  int32_t r0 = 0;
  for (const SeqSpec& s : seqs) {
    for (int32_t r = r0; r < r0 + s.count; ++r) {
      const float* yr = y.data() + static_cast<size_t>(r) * y_width;
      const float* y0r = y0.data() + static_cast<size_t>(r) * y_width;
      if (s.adapter < 0) {  // untouched, bitwise
        for (int32_t j = 0; j < y_width; ++j) ASSERT_EQ(yr[j], y0r[j]) << "row " << r;
        continue;
      }
      std::vector<double> want, tol;
      Reference(ads[s.adapter], x.data() + static_cast<size_t>(r) * in, y0r, y_width, &want, &tol);
      for (int32_t j = 0; j < y_width; ++j) {
        ASSERT_NEAR(yr[j], want[j], tol[j]) << "row " << r << " col " << j;
      }
    }
    r0 += s.count;
  }
}

TEST(LoraEmulationTest, SegmentsJoinConsecutiveRowsOfOneAdapterAndCutLongOnes) {
  int a = 0, b = 0;
  std::vector<cuda::LoraSeqRows> rows = {{0, 1, &a},  {1, 1, &a},  {2, 1, nullptr}, {3, 1, &a},
                                         {4, 40, &b}, {44, 1, &b}, {45, 1, &a}};
  std::vector<int32_t> w;
  const int32_t n = cuda::AppendLoraSegments(rows, &w);
  // [0,2) a | [3,4) a | [4,20) [20,36) [36,45) b | [45,46) a
  ASSERT_EQ(n, 6);
  const std::vector<std::pair<int32_t, int32_t>> want = {{0, 2},   {3, 4},   {4, 20},
                                                         {20, 36}, {36, 45}, {45, 46}};
  for (int32_t s = 0; s < n; ++s) {
    EXPECT_EQ(w[s * 4], want[s].first) << s;
    EXPECT_EQ(w[s * 4 + 1], want[s].second) << s;
  }
  EXPECT_EQ(cuda::AppendLoraSegments({{0, 3, nullptr}}, &w), 0);
}

// qkv-like site: three modules (q wider than k, v), prefill and decode rows mixed.
TEST(LoraEmulationTest, MixedAdaptersAndRanksMatchFloat64) {
  RunCase({8, 16, 32}, {{5, 0}, {1, -1}, {1, 1}, {1, 1}, {37, 2}, {3, -1}, {1, 0}, {2, 2}}, 96,
          {64, 32, 32}, {true, true, true}, 1);
}

// gate_up-like site with an output wider than a block (column tiles), one module not
// adapted; o/down-like single module.
TEST(LoraEmulationTest, ColumnTilesOffsetsAndUnadaptedModules) {
  RunCase({16, 32}, {{3, 1}, {2, -1}, {20, 0}}, 72, {300, 300}, {false, true}, 2);
  RunCase({8, 32}, {{1, 0}, {1, 1}, {4, 0}}, 300, {48}, {true}, 3);
}

}  // namespace
}  // namespace superpose
