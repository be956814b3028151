// The CUDA paged-attention kernels' bodies (cuda/attention_body.h, and the tensor-core
// prefill body cuda/attention_tc_body.h), run on CPU threads: one std::thread per CUDA
// thread of a block (128), a barrier for __syncthreads (and one per warp for
// __syncwarp), float K/V. Checks their key indexing, causal masking, GQA head mapping,
// tiling and online softmax against a double-precision reference on any machine; the
// GPU test (cuda_backend_test) checks the same kernels on a device with bf16 K/V.
//
// The tensor-core body's warp-matrix ops are emulated with the same math as wmma's
// (bf16 inputs, float accumulation) and warp-collective semantics: every lane computes
// the whole 16x16 result (so all lanes see it), loads read shared memory without an
// implicit barrier and stores write each element from one lane only, so that a missing
// warp_sync() shows up as a race on poisoned (NaN) memory; every lane of a warp must
// have issued the same number of collective ops at each barrier (else the test fails),
// and every fragment pointer must be 32-byte aligned with a legal ldm.
//
// Tolerances: the SIMT body computes in float32 (2e-5 absolute). The tensor-core body
// gets bf16-exact q, K, V here (so only what the kernel itself rounds matters: P to
// bf16, one rounding of at most 2^-9 relative per weight, normalised by the sum of the
// rounded weights, so the output moves by at most 2^-9 * max|v - out| <= 2^-8 for
// |v| <= 1), plus float32 accumulation: 4e-3 absolute.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "cuda/attention_body.h"
#include "cuda/attention_tc_body.h"
#include "tests/attention_case.h"
#include "tests/block_emulation.h"

namespace superpose {
namespace {

using testing::Barrier;

struct HostCtx : testing::BlockCtx {
  float load(const float* p, int64_t i) const { return p[i]; }
  void store(float* p, int64_t i, float v) const { p[i] = v; }
};

// Runs the kernel's grid (num_tiles x kvh blocks of kAttnThreads threads) on the CPU.
void EmulateAttention(const std::vector<float>& q, const std::vector<float>& kpool,
                      const std::vector<float>& vpool, const std::vector<int32_t>& keys,
                      const std::vector<cuda::AttnTile>& tiles, int32_t max_tile_tokens, int32_t qh,
                      int32_t kvh, int32_t D, float scale, std::vector<float>* out) {
  const int32_t G = qh / kvh;
  // Poison shared memory with NaN: a value read before it is written shows up.
  std::vector<float> smem(cuda::AttentionSharedFloats(max_tile_tokens * G, D));
  const int n = cuda::kAttnThreads;
  for (size_t i = 0; i < tiles.size(); ++i) {
    for (int32_t g = 0; g < kvh; ++g) {
      std::fill(smem.begin(), smem.end(), std::nanf(""));
      testing::RunBlock<HostCtx>(n, [&](HostCtx& c) {
        cuda::AttentionBlock(c, tiles[i], g, smem.data(), q.data(), kpool.data(), vpool.data(),
                             keys.data(), qh, kvh, D, G, scale, out->data());
      });
    }
  }
}

std::vector<float> Uniform(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

void Check(int32_t qh, int32_t kvh, int32_t D, int32_t tile_tokens) {
  const testing::AttentionCase c = testing::MakeAttentionCase(qh, kvh, D, tile_tokens, Uniform);
  std::vector<float> out(static_cast<size_t>(c.T) * qh * D, std::nanf(""));
  EmulateAttention(c.q, c.kpool, c.vpool, c.flat, c.tiles, tile_tokens, qh, kvh, D, c.scale, &out);
  testing::ExpectMatchesReference(c, out, 2e-5, "tile " + std::to_string(tile_tokens));
}

TEST(AttentionEmulationTest, MatchesReferenceOnCpuThreads) {
  for (int32_t tile : {1, 4, 16}) {
    Check(8, 4, 8, tile);   // stories260k: GQA 2, head_dim 8
    Check(8, 2, 64, tile);  // GQA 4
    Check(4, 4, 32, tile);  // MHA
  }
}

// Split-K: the split kernel's grid (tiles x kvh x nsplit blocks, partials into a
// NaN-poisoned workspace), then the combine kernel's (tiles x kvh).
void EmulateSplitAttention(const testing::AttentionCase& c, int32_t max_tile_tokens, int32_t nsplit,
                           int32_t min_keys, std::vector<float>* out) {
  const int32_t G = c.qh / c.kvh;
  const size_t stride = cuda::SplitPartialFloats(max_tile_tokens * G, c.D);
  std::vector<float> part(c.tiles.size() * c.kvh * nsplit * stride, std::nanf(""));
  std::vector<float> smem(cuda::AttentionSharedFloats(max_tile_tokens * G, c.D));
  for (size_t i = 0; i < c.tiles.size(); ++i) {
    for (int32_t g = 0; g < c.kvh; ++g) {
      for (int32_t s = 0; s < nsplit; ++s) {
        std::fill(smem.begin(), smem.end(), std::nanf(""));
        cuda::SplitOut so;
        so.part = part.data();
        so.tile_index = static_cast<int32_t>(i);
        so.split = s;
        so.nsplit = nsplit;
        so.min_keys = min_keys;
        so.stride = stride;
        testing::RunBlock<HostCtx>(cuda::kAttnThreads, [&](HostCtx& ctx) {
          cuda::AttentionBlock(ctx, c.tiles[i], g, smem.data(), c.q.data(), c.kpool.data(),
                               c.vpool.data(), c.flat.data(), c.qh, c.kvh, c.D, G, c.scale,
                               out->data(), so);
        });
      }
      testing::RunBlock<HostCtx>(cuda::kAttnThreads, [&](HostCtx& ctx) {
        cuda::AttentionCombine(ctx, c.tiles[i], static_cast<int32_t>(i), g, part.data(), nsplit,
                               stride, c.qh, c.kvh, c.D, G, out->data());
      });
    }
  }
}

TEST(AttentionEmulationTest, SplitKMatchesReference) {
  // Decode tiles over contexts around the split boundaries (some splits empty, some
  // shorter than a key tile), and prefill tiles (causal rows inside a split).
  const std::vector<std::pair<int32_t, int32_t>> decode = {{0, 1},  {5, 1},   {31, 1}, {32, 1},
                                                           {63, 1}, {100, 1}, {300, 1}};
  for (const auto& [nsplit, min_keys] :
       std::vector<std::pair<int32_t, int32_t>>{{2, 32}, {5, 32}, {16, 32}, {3, 256}, {1, 256}}) {
    const std::string what =
        "nsplit " + std::to_string(nsplit) + " min_keys " + std::to_string(min_keys);
    testing::AttentionCase c = testing::MakeSeqsCase(8, 2, 16, 1, decode, 7, Uniform);
    std::vector<float> out(static_cast<size_t>(c.T) * c.qh * c.D, std::nanf(""));
    EmulateSplitAttention(c, 1, nsplit, min_keys, &out);
    testing::ExpectMatchesReference(c, out, 2e-5, "decode, " + what);
    if (nsplit == 5) {
      testing::AttentionCase p = testing::MakeAttentionCase(8, 4, 8, 4, Uniform);
      std::vector<float> pout(static_cast<size_t>(p.T) * p.qh * p.D, std::nanf(""));
      EmulateSplitAttention(p, 4, nsplit, min_keys, &pout);
      testing::ExpectMatchesReference(p, pout, 2e-5, "prefill tiles, " + what);
    }
  }
}

TEST(AttentionEmulationTest, SplitRangesCoverTheKeysOnce) {
  for (int32_t nk : {1, 31, 32, 33, 255, 256, 257, 1000, 4097, 100000}) {
    for (int32_t nsplit : {1, 2, 3, 7, 16}) {
      for (int32_t min_keys : {32, 256}) {
        int32_t next = 0;
        for (int32_t s = 0; s < nsplit; ++s) {
          int32_t k0 = -1, k1 = -1;
          cuda::SplitRange(nk, s, nsplit, min_keys, &k0, &k1);
          ASSERT_EQ(k0, next) << nk << " " << nsplit << " " << s;
          ASSERT_LE(k0, k1);
          if (k1 < nk && nsplit > 1) {
            EXPECT_EQ((k1 - k0) % cuda::kKeyTile, 0);
            EXPECT_GE(k1 - k0, min_keys);
          }
          next = k1;
        }
        EXPECT_EQ(next, nk) << nk << " " << nsplit;
      }
    }
  }
}

// ---- The tensor-core body. ----

struct Bf16 {
  uint16_t bits;
};
Bf16 ToBf16(float v) {  // round to nearest even, NaN stays NaN (as __float2bfloat16)
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return Bf16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return Bf16{static_cast<uint16_t>(u >> 16)};
}
float FromBf16(Bf16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
float RoundBf16(float v) { return FromBf16(ToBf16(v)); }

// What the threads of one emulated block share besides shared memory.
struct TcBlockState {
  std::vector<int64_t> collectives = std::vector<int64_t>(cuda::kTcThreads, 0);
  std::atomic<bool> diverged{false}, misaligned{false};
  // Lanes of warp w issued the same number of collective ops.
  void CheckWarp(int w) {
    for (int l = 1; l < 32; ++l) {
      if (collectives[32 * w + l] != collectives[32 * w]) diverged = true;
    }
  }
};

template <int kKind>  // 0: A, 1: B col-major, 2: B row-major, 3: accumulator
struct Frag {
  float v[256];  // element (row, col) of the 16x16 matrix at v[row * 16 + col]
};

// The warp-matrix API of attention_tc_body.h with loops; see the top of this file.
struct TcHostCtx {
  int t;
  Barrier* block;
  Barrier* warp_barrier;
  TcBlockState* st;
  const float *kpool, *vpool;  // for copy8's alignment check
  size_t pool_size;
  using bf16 = Bf16;
  using FragA = Frag<0>;
  using FragBc = Frag<1>;
  using FragBr = Frag<2>;
  using FragC = Frag<3>;
  int tid() const { return t; }
  int nthreads() const { return cuda::kTcThreads; }
  int warp() const { return t / 32; }
  int lane() const { return t % 32; }
  void sync() const { block->Wait(); }
  void warp_sync() const { warp_barrier->Wait(); }
  void store(float* p, int64_t i, float v) const { p[i] = v; }
  bf16 to_bf16(float v) const { return ToBf16(v); }
  float to_float(bf16 v) const { return FromBf16(v); }
  // 16-byte aligned on the device: the pool offset a multiple of 8 elements (the pool's
  // base is aligned there), dst 16-byte aligned.
  void copy8(bf16* dst, const float* src) const {
    const float* pool = src >= kpool && src < kpool + pool_size ? kpool : vpool;
    if ((src - pool) % 8 != 0 || reinterpret_cast<uintptr_t>(dst) % 16 != 0) st->misaligned = true;
    for (int e = 0; e < 8; ++e) dst[e] = ToBf16(src[e]);
  }

  void Collective(const void* p, int ldm, int multiple) const {
    ++st->collectives[t];
    if (p != nullptr && (reinterpret_cast<uintptr_t>(p) % 32 != 0 || ldm % multiple != 0)) {
      st->misaligned = true;
    }
  }
  void fill_c(FragC& f) const {
    Collective(nullptr, 0, 1);
    for (float& x : f.v) x = 0.0f;
  }
  void load_a(FragA& f, const bf16* p, int ldm) const {
    Collective(p, ldm, 8);
    for (int i = 0; i < 16; ++i)
      for (int k = 0; k < 16; ++k) f.v[i * 16 + k] = FromBf16(p[i * ldm + k]);
  }
  void load_b_col(FragBc& f, const bf16* p, int ldm) const {
    Collective(p, ldm, 8);
    for (int k = 0; k < 16; ++k)
      for (int j = 0; j < 16; ++j) f.v[k * 16 + j] = FromBf16(p[j * ldm + k]);
  }
  void load_b_row(FragBr& f, const bf16* p, int ldm) const {
    Collective(p, ldm, 8);
    for (int k = 0; k < 16; ++k)
      for (int j = 0; j < 16; ++j) f.v[k * 16 + j] = FromBf16(p[k * ldm + j]);
  }
  void load_c(FragC& f, const float* p, int ldm) const {
    Collective(p, ldm, 4);
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) f.v[i * 16 + j] = p[i * ldm + j];
  }
  void store_c(float* p, const FragC& f, int ldm) const {
    Collective(p, ldm, 4);
    for (int e = lane(); e < 256; e += 32) p[(e / 16) * ldm + e % 16] = f.v[e];
  }
  template <class FragB>
  void mma(FragC& d, const FragA& a, const FragB& b, const FragC& c) const {
    Collective(nullptr, 0, 1);
    float r[256];
    for (int i = 0; i < 16; ++i) {
      for (int j = 0; j < 16; ++j) {
        float acc = c.v[i * 16 + j];
        for (int k = 0; k < 16; ++k) acc += a.v[i * 16 + k] * b.v[k * 16 + j];
        r[i * 16 + j] = acc;
      }
    }
    std::memcpy(d.v, r, sizeof(r));
  }
};

// Runs the tensor-core kernel's grid (num_tiles x kvh blocks of kTcThreads threads).
void EmulateTcAttention(const testing::AttentionCase& c, std::vector<float>* out) {
  const int32_t G = c.qh / c.kvh;
  const size_t bytes = cuda::TcAttentionSharedBytes(c.D);
  std::unique_ptr<unsigned char, decltype(&std::free)> smem(
      static_cast<unsigned char*>(std::aligned_alloc(128, (bytes + 127) / 128 * 128)), &std::free);
  const int n = cuda::kTcThreads, nwarps = n / 32;
  for (size_t i = 0; i < c.tiles.size(); ++i) {
    ASSERT_LE(c.tiles[i].ntok * G, cuda::kTcRows);
    for (int32_t g = 0; g < c.kvh; ++g) {
      std::memset(smem.get(), 0xff, bytes);  // NaN as bf16 and as float
      TcBlockState st;
      Barrier block(n, [&] {
        for (int w = 0; w < nwarps; ++w) st.CheckWarp(w);
      });
      std::vector<std::unique_ptr<Barrier>> warps;
      for (int w = 0; w < nwarps; ++w) {
        warps.push_back(std::make_unique<Barrier>(32, [&st, w] { st.CheckWarp(w); }));
      }
      std::vector<std::thread> threads;
      for (int t = 0; t < n; ++t) {
        threads.emplace_back([&, t] {
          TcHostCtx ctx{
              t, &block, warps[t / 32].get(), &st, c.kpool.data(), c.vpool.data(), c.kpool.size()};
          cuda::TcAttentionBlock(ctx, c.tiles[i], g, smem.get(), c.q.data(), c.kpool.data(),
                                 c.vpool.data(), c.flat.data(), c.qh, c.kvh, c.D, G, c.scale,
                                 out->data());
        });
      }
      for (auto& th : threads) th.join();
      for (int w = 0; w < nwarps; ++w) st.CheckWarp(w);
      ASSERT_FALSE(st.diverged) << "lanes of a warp issued different collective ops";
      ASSERT_FALSE(st.misaligned) << "a fragment pointer or ldm breaks wmma's alignment";
    }
  }
}

std::vector<float> RoundedUniform(size_t n, uint32_t seed) {
  std::vector<float> v = Uniform(n, seed);
  for (float& x : v) x = RoundBf16(x);
  return v;
}

testing::AttentionCase MakeSeqsCase(int32_t qh, int32_t kvh, int32_t D, int32_t tile_tokens,
                                    const std::vector<std::pair<int32_t, int32_t>>& seqs,
                                    uint32_t seed) {
  return testing::MakeSeqsCase(qh, kvh, D, tile_tokens, seqs, seed, RoundedUniform);
}

// Max |out - reference| (the reference of ExpectMatchesReference), for the log.
double MaxError(const testing::AttentionCase& c, const std::vector<float>& out) {
  const int32_t G = c.qh / c.kvh, D = c.D;
  double worst = 0;
  for (int32_t t = 0; t < c.T; ++t) {
    const int32_t s = c.seq_of[t], nk = c.ctx_len[s] + c.idx_in_seq[t] + 1;
    for (int32_t h = 0; h < c.qh; ++h) {
      std::vector<double> sc(nk);
      double mx = -1e300, sum = 0;
      for (int32_t k = 0; k < nk; ++k) {
        double dot = 0;
        for (int32_t d = 0; d < D; ++d) {
          dot += static_cast<double>(c.q[(static_cast<size_t>(t) * c.qh + h) * D + d]) *
                 c.kpool[(static_cast<size_t>(c.keys[s][k]) * c.kvh + h / G) * D + d];
        }
        mx = std::max(mx, sc[k] = dot * c.scale);
      }
      for (double& v : sc) sum += (v = std::exp(v - mx));
      for (int32_t d = 0; d < D; ++d) {
        double acc = 0;
        for (int32_t k = 0; k < nk; ++k) {
          acc += sc[k] * c.vpool[(static_cast<size_t>(c.keys[s][k]) * c.kvh + h / G) * D + d];
        }
        worst = std::max(worst,
                         std::fabs(out[(static_cast<size_t>(t) * c.qh + h) * D + d] - acc / sum));
      }
    }
  }
  return worst;
}

constexpr double kTcTol = 4e-3;

void CheckTc(const testing::AttentionCase& c, const std::string& what) {
  std::vector<float> out(static_cast<size_t>(c.T) * c.qh * c.D, std::nanf(""));
  EmulateTcAttention(c, &out);
  if (::testing::Test::HasFatalFailure()) return;
  std::printf("tensor-core emulation %s: qh %d kvh %d D %d, max error %.2e\n", what.c_str(), c.qh,
              c.kvh, c.D, MaxError(c, out));
  testing::ExpectMatchesReference(c, out, kTcTol, what);
}

// The shared three-sequence case (prefix block, partial segment, a decode tile) with
// the backend's prefill tiles of 64 / G tokens.
TEST(AttentionEmulationTest, TensorCoreMatchesReferenceOnSharedCase) {
  for (const auto& [qh, kvh, D] :
       std::vector<std::tuple<int32_t, int32_t, int32_t>>{{8, 2, 64}, {4, 4, 32}, {4, 1, 16}}) {
    const int32_t G = qh / kvh;
    CheckTc(
        testing::MakeAttentionCase(qh, kvh, D, cuda::kTcRows / G,
                                   [](size_t n, uint32_t seed) { return RoundedUniform(n, seed); }),
        "shared case");
  }
}

// Several key tiles, key tiles ending exactly at 64, contexts spanning tiles, partial
// query tiles, single-token tiles; G = 1 and 4, head_dim 64 and 128.
TEST(AttentionEmulationTest, TensorCoreMatchesReferenceOnLongSequences) {
  const std::vector<std::pair<int32_t, int32_t>> seqs = {{0, 70}, {75, 5}, {13, 1}, {64, 64}};
  for (const auto& [qh, kvh, D] : std::vector<std::tuple<int32_t, int32_t, int32_t>>{
           {8, 2, 128}, {2, 2, 64}, {4, 1, 64}, {2, 2, 128}}) {
    const int32_t G = qh / kvh;
    CheckTc(MakeSeqsCase(qh, kvh, D, cuda::kTcRows / G, seqs, 7 + D), "long sequences");
  }
  // Tiles smaller than 64 rows (warps without rows) and G that does not divide 64.
  CheckTc(MakeSeqsCase(6, 2, 64, 7, {{20, 30}, {0, 9}}, 5), "tiles of 7 tokens, G 3");
}

}  // namespace
}  // namespace superpose
