// The CUDA backend against CPU references. Every test skips (GTEST_SKIP with the reason)
// in a build without CUDA or on a machine without a usable GPU.
//
// Tolerances (bf16 = 8 significant bits, so one rounding is at most 2^-9 relative):
//   embedding            exact (bf16 -> float is exact)
//   add + RMSNorm        x exact (same float adds); h within 2^-8 |ref| + 1e-6
//   QKV post (RoPE)      q (float) within 2e-5 of the row scale; k, v (bf16 in the pool)
//                        within 2^-8 |ref| + 2e-5
//   attention            within 8e-3 absolute (outputs are averages of |v| <= 1, one
//                        bf16 rounding of the output)
//   tensor-core attention within 8e-3 absolute of the reference and of the SIMT kernel
//                        (bf16-exact inputs; P rounded to bf16 moves an output by at most
//                        2^-9 * max|v - out| <= 2^-8, plus the output's rounding);
//                        whole prefill Forward tensor_core vs simt: as Forward vs CPU
//   SwiGLU               within 2^-8 |ref| + 1e-6
//   GEMM (cuBLAS)        within 1e-4 * sum_k |x_k w_k| + 1e-6 (float accumulation)
//   log-softmax gather   within 1e-4 absolute
//   whole Forward        vs the float32 CpuBackend loaded with the same weights rounded
//                        to bf16 (so what differs is bf16 activations, K/V and summation
//                        order): stories260k every logit within 0.05 * max|logit| of its
//                        row and the mean within 0.01 * max|logit|; the built-in random
//                        model, which is far less well-conditioned, 3x that. (Measured
//                        on the CPU: rounding the weights alone moves stories260k's
//                        logits by at most 0.010 * max|logit|, the built-in model's by
//                        0.051, and keeps stories260k's golden greedy tokens.)
//   logprobs             within k * (0.05 |ref| + 0.05), k = 1 resp. 3 as above
//   golden greedy        teacher-forced: the golden token is the argmax or within
//                        0.05 * max|logit| of it at every step; free-running greedy
//                        through the engine: the same 64 tokens (CUDA graphs on and off)
//   CUDA graphs          decode steps replayed from graphs vs the same steps launched
//                        kernel by kernel: bitwise equal (same kernels, same inputs);
//                        logits rows picked out of the graph's full batch by a subset
//                        or permutation of logits_for: within 1e-3 * max|logit| of the
//                        row (the eager step multiplies only those rows)
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "engine/model/config.h"
#include "engine/model/weights.h"
#include "engine/runtime/engine.h"
#include "engine/runtime/model_bundle.h"
#include "tests/attention_case.h"
#include "tests/rounded_weights.h"
#include "tests/test_util.h"

#if SUPERPOSE_HAVE_CUDA
#include "cuda/cuda_backend.h"
#include "cuda/cuda_errors.h"
#include "cuda/cuda_util.h"
#include "cuda/kernel_check.h"
#include "cuda/kernels.h"
#include "cuda/step_meta.h"
#endif

namespace superpose {
namespace {

class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
#if SUPERPOSE_HAVE_CUDA
    std::string why;
    if (!cuda::CudaAvailable(&why)) GTEST_SKIP() << "no usable CUDA device: " << why;
#else
    GTEST_SKIP() << "built without CUDA (SUPERPOSE_HAVE_CUDA is off)";
#endif
  }
};

#if SUPERPOSE_HAVE_CUDA

// Non-zero values in [-hi, -lo] U [lo, hi].
std::vector<float> RandomNonZero(size_t n, uint32_t seed, float lo = 0.05f, float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> mag(lo, hi);
  std::bernoulli_distribution sign(0.5);
  std::vector<float> v(n);
  for (float& x : v) x = sign(rng) ? mag(rng) : -mag(rng);
  return v;
}

constexpr float kBf16Rel = 1.0f / 256.0f;  // 2^-8: one rounding plus float noise

std::vector<float> Rounded(std::vector<float> v) {
  for (float& x : v) x = cuda::check::RoundBf16(x);
  return v;
}

TEST_F(CudaTest, EmbeddingMatchesExactly) {
  const int32_t H = 72, vocab_begin = 10, vocab_local = 20;
  const auto table = RandomNonZero(static_cast<size_t>(vocab_local) * H, 1);
  const std::vector<int32_t> tokens = {10, 29, 15, 3, 30, 11};  // 3 and 30: other ranks
  std::vector<float> x;
  ASSERT_TRUE(cuda::check::Embedding(tokens, table, vocab_begin, vocab_local, H, &x).ok());
  const auto rt = Rounded(table);
  for (size_t t = 0; t < tokens.size(); ++t) {
    const int32_t id = tokens[t] - vocab_begin;
    for (int32_t i = 0; i < H; ++i) {
      const float want = id >= 0 && id < vocab_local ? rt[static_cast<size_t>(id) * H + i] : 0.0f;
      ASSERT_EQ(x[t * H + i], want) << "token " << t << " i " << i;
    }
  }
}

TEST_F(CudaTest, AddRmsNormMatchesReference) {
  for (int32_t H : {64, 1000, 4096}) {
    const int32_t T = 5;
    const float eps = 1e-5f;
    std::vector<float> x = RandomNonZero(static_cast<size_t>(T) * H, 2);
    const auto add = RandomNonZero(x.size(), 3);
    const auto w = RandomNonZero(H, 4, 0.5f, 1.5f);
    for (bool with_add : {false, true}) {
      std::vector<float> gx = x, h;
      ASSERT_TRUE(
          cuda::check::AddRmsNorm(&gx, with_add ? add : std::vector<float>{}, w, T, H, eps, &h)
              .ok());
      for (int32_t t = 0; t < T; ++t) {
        double ss = 0;
        std::vector<float> v(H);
        for (int32_t i = 0; i < H; ++i) {
          v[i] = x[t * H + i] + (with_add ? add[t * H + i] : 0.0f);
          ss += static_cast<double>(v[i]) * v[i];
        }
        const double inv = 1.0 / std::sqrt(ss / H + eps);
        for (int32_t i = 0; i < H; ++i) {
          ASSERT_EQ(gx[t * H + i], v[i]);
          const double want = v[i] * inv * w[i];
          ASSERT_NEAR(h[t * H + i], want, kBf16Rel * std::abs(want) + 1e-6)
              << "H " << H << " t " << t << " i " << i;
        }
      }
    }
  }
}

void RmsNormRef(std::vector<double>& v, const std::vector<float>& w, float eps) {
  double ss = 0;
  for (double x : v) ss += x * x;
  const double inv = 1.0 / std::sqrt(ss / v.size() + eps);
  for (size_t i = 0; i < v.size(); ++i) v[i] = v[i] * inv * w[i];
}

TEST_F(CudaTest, QkvPostMatchesReference) {
  const int32_t qh = 4, kvh = 2, D = 64, T = 3, num_slots = 8, half = D / 2;
  const float eps = 1e-6f;
  engine::ModelConfig cfg;
  cfg.head_dim = D;
  cfg.rope_theta = 500000.0f;
  const std::vector<float> inv_freq = engine::RopeInvFreq(cfg);
  const std::vector<float> positions = {0.0f, 7.5f, 1234.25f};
  const std::vector<int32_t> slots = {5, 0, 3};
  const int32_t W = (qh + 2 * kvh) * D;
  const auto qkv = RandomNonZero(static_cast<size_t>(T) * W, 5);
  for (bool extras : {false, true}) {
    const auto bias = extras ? RandomNonZero(W, 6) : std::vector<float>{};
    const auto qn = extras ? RandomNonZero(D, 7, 0.5f, 1.5f) : std::vector<float>{};
    const auto kn = extras ? RandomNonZero(D, 8, 0.5f, 1.5f) : std::vector<float>{};
    const auto pool0 = RandomNonZero(static_cast<size_t>(num_slots) * kvh * D, 9);
    std::vector<float> q, kp = pool0, vp = pool0;
    ASSERT_TRUE(cuda::check::QkvPost(qkv, bias, qn, kn, positions, inv_freq, slots, qh, kvh, D, eps,
                                     &q, &kp, &vp)
                    .ok());
    std::vector<bool> written(num_slots, false);
    for (int32_t t = 0; t < T; ++t) {
      written[slots[t]] = true;
      for (int32_t hd = 0; hd < qh + 2 * kvh; ++hd) {
        std::vector<double> v(D);
        for (int32_t d = 0; d < D; ++d) {
          v[d] = qkv[static_cast<size_t>(t) * W + hd * D + d] + (extras ? bias[hd * D + d] : 0.0f);
        }
        if (hd < qh + kvh) {
          if (extras) RmsNormRef(v, hd < qh ? qn : kn, eps);
          std::vector<double> r(D);
          for (int32_t i = 0; i < half; ++i) {
            const double a = static_cast<double>(positions[t] * inv_freq[i]);
            r[i] = v[i] * std::cos(a) - v[i + half] * std::sin(a);
            r[i + half] = v[i + half] * std::cos(a) + v[i] * std::sin(a);
          }
          v = r;
        }
        double scale = 0;
        for (double x : v) scale = std::max(scale, std::abs(x));
        for (int32_t d = 0; d < D; ++d) {
          if (hd < qh) {
            ASSERT_NEAR(q[(static_cast<size_t>(t) * qh + hd) * D + d], v[d], 2e-5 * scale)
                << "q t " << t << " head " << hd << " d " << d;
          } else {
            const bool is_k = hd < qh + kvh;
            const int32_t kh = is_k ? hd - qh : hd - qh - kvh;
            const float got = (is_k ? kp : vp)[(static_cast<size_t>(slots[t]) * kvh + kh) * D + d];
            ASSERT_NEAR(got, v[d], kBf16Rel * std::abs(v[d]) + 2e-5 * scale)
                << (is_k ? "k" : "v") << " t " << t << " head " << kh << " d " << d;
          }
        }
      }
    }
    // Slots no token writes keep their contents.
    const auto r0 = Rounded(pool0);
    for (int32_t s = 0; s < num_slots; ++s) {
      if (written[s]) continue;
      for (int32_t i = 0; i < kvh * D; ++i) {
        ASSERT_EQ(kp[s * kvh * D + i], r0[s * kvh * D + i]);
        ASSERT_EQ(vp[s * kvh * D + i], r0[s * kvh * D + i]);
      }
    }
  }
}

// Attention over a paged pool (tests/attention_case.h): sequences sharing a prefix
// block, a partial segment, prefill and decode tiles, GQA.
void CheckAttention(int32_t qh, int32_t kvh, int32_t D, int32_t tile_tokens) {
  const testing::AttentionCase c = testing::MakeAttentionCase(
      qh, kvh, D, tile_tokens,
      [](size_t n, uint32_t seed) { return Rounded(RandomNonZero(n, 10 + seed)); });
  std::vector<float> out;
  ASSERT_TRUE(cuda::check::Attention(c.q, c.kpool, c.vpool, c.flat, c.tiles, tile_tokens, c.T, qh,
                                     kvh, D, c.scale, &out)
                  .ok());
  testing::ExpectMatchesReference(c, out, 8e-3, "tile " + std::to_string(tile_tokens));
}

TEST_F(CudaTest, AttentionMatchesReference) {
  for (int32_t tile : {1, 4, 16}) {
    CheckAttention(8, 4, 8, tile);    // stories260k shape
    CheckAttention(8, 2, 128, tile);  // GQA 4, Llama head_dim
    CheckAttention(4, 4, 64, tile);   // MHA
  }
}

// Split-K decode attention: contexts across split and key-tile boundaries, small and
// production minimum split sizes, against the reference (tolerance as the SIMT kernel).
TEST_F(CudaTest, SplitAttentionMatchesReference) {
  const std::vector<std::pair<int32_t, int32_t>> decode = {{0, 1},   {5, 1},   {31, 1},  {32, 1},
                                                           {100, 1}, {300, 1}, {1500, 1}};
  for (const auto& [nsplit, min_keys] :
       std::vector<std::pair<int32_t, int32_t>>{{2, 32}, {5, 32}, {16, 32}, {16, 256}, {3, 256}}) {
    for (const auto& [qh, kvh, D] :
         std::vector<std::tuple<int32_t, int32_t, int32_t>>{{8, 4, 8}, {32, 8, 128}}) {
      testing::AttentionCase c = testing::MakeSeqsCase(
          qh, kvh, D, 1, decode, 11,
          [](size_t n, uint32_t seed) { return Rounded(RandomNonZero(n, 10 + seed)); });
      std::vector<float> out;
      ASSERT_TRUE(cuda::check::SplitAttention(c.q, c.kpool, c.vpool, c.flat, c.tiles, 1, c.T, qh,
                                              kvh, D, c.scale, nsplit, min_keys, &out)
                      .ok());
      testing::ExpectMatchesReference(
          c, out, 8e-3,
          "split " + std::to_string(nsplit) + " min_keys " + std::to_string(min_keys));
    }
  }
}

// The tensor-core prefill kernel on the shared case and on longer sequences (several
// key tiles, tiles of 64 / G tokens, contexts spanning key tiles, single-token tiles),
// against the reference and against the SIMT kernel on the same inputs.
void CheckTcAttention(const testing::AttentionCase& c, int32_t tile_tokens,
                      const std::string& what) {
  std::vector<float> tc, simt;
  absl::Status st = cuda::check::TcAttention(c.q, c.kpool, c.vpool, c.flat, c.tiles, tile_tokens,
                                             c.T, c.qh, c.kvh, c.D, c.scale, &tc);
  ASSERT_TRUE(st.ok()) << st;
  st = cuda::check::Attention(c.q, c.kpool, c.vpool, c.flat, c.tiles, tile_tokens, c.T, c.qh, c.kvh,
                              c.D, c.scale, &simt);
  ASSERT_TRUE(st.ok()) << st;
  double worst = 0;
  for (size_t i = 0; i < tc.size(); ++i) {
    worst = std::max(worst, static_cast<double>(std::abs(tc[i] - simt[i])));
  }
  EXPECT_LE(worst, 8e-3) << what << ": tensor-core vs SIMT kernel";
  std::printf("tensor-core attention %s qh %d kvh %d D %d: max |tc - simt| %.2e\n", what.c_str(),
              c.qh, c.kvh, c.D, worst);
  testing::ExpectMatchesReference(c, tc, 8e-3, what);
}

// Sequences of (context, new tokens) over a pool of exactly their keys, shuffled.
testing::AttentionCase SeqsCase(int32_t qh, int32_t kvh, int32_t D, int32_t tile_tokens,
                                const std::vector<std::pair<int32_t, int32_t>>& seqs,
                                uint32_t seed) {
  return testing::MakeSeqsCase(qh, kvh, D, tile_tokens, seqs, seed,
                               [](size_t n, uint32_t s) { return Rounded(RandomNonZero(n, s)); });
}

TEST_F(CudaTest, TensorCoreAttentionMatchesReference) {
  auto random = [](size_t n, uint32_t seed) { return Rounded(RandomNonZero(n, 20 + seed)); };
  for (const auto& [qh, kvh, D] : std::vector<std::tuple<int32_t, int32_t, int32_t>>{
           {8, 2, 128}, {4, 4, 64}, {4, 2, 32}, {4, 1, 16}}) {
    const int32_t tile = 64 / (qh / kvh);
    CheckTcAttention(testing::MakeAttentionCase(qh, kvh, D, tile, random), tile, "shared case");
  }
  const std::vector<std::pair<int32_t, int32_t>> seqs = {
      {0, 70}, {75, 5}, {13, 1}, {64, 64}, {300, 200}};
  for (const auto& [qh, kvh, D] : std::vector<std::tuple<int32_t, int32_t, int32_t>>{
           {32, 8, 128}, {2, 2, 64}, {4, 1, 64}, {12, 4, 96}}) {
    const int32_t tile = 64 / (qh / kvh);
    CheckTcAttention(SeqsCase(qh, kvh, D, tile, seqs, 30 + D), tile, "long sequences");
  }
  CheckTcAttention(SeqsCase(6, 2, 64, 7, {{20, 30}, {0, 9}}, 5), 7, "tiles of 7 tokens, G 3");
}

TEST_F(CudaTest, SwiGluMatchesReference) {
  const int32_t T = 7, I = 172;
  const auto gu = RandomNonZero(static_cast<size_t>(T) * 2 * I, 14, 0.05f, 4.0f);
  std::vector<float> act;
  ASSERT_TRUE(cuda::check::SwiGlu(gu, T, I, &act).ok());
  for (int32_t t = 0; t < T; ++t) {
    for (int32_t i = 0; i < I; ++i) {
      const double g = gu[t * 2 * I + i], u = gu[t * 2 * I + I + i];
      const double want = g / (1.0 + std::exp(-g)) * u;
      ASSERT_NEAR(act[t * I + i], want, kBf16Rel * std::abs(want) + 1e-6);
    }
  }
}

TEST_F(CudaTest, GemmMatchesReference) {
  struct Shape {
    int32_t rows, in, out;
  };
  for (Shape sh : {Shape{1, 64, 48}, Shape{5, 172, 67}, Shape{33, 512, 384}}) {
    const auto x = RandomNonZero(static_cast<size_t>(sh.rows) * sh.in, 15);
    const auto w = RandomNonZero(static_cast<size_t>(sh.out) * sh.in, 16);
    std::vector<float> y;
    ASSERT_TRUE(cuda::check::Gemm(x, w, sh.rows, sh.in, sh.out, &y).ok());
    const auto rx = Rounded(x), rw = Rounded(w);
    for (int32_t r = 0; r < sh.rows; ++r) {
      for (int32_t o = 0; o < sh.out; ++o) {
        double acc = 0, mag = 0;
        for (int32_t k = 0; k < sh.in; ++k) {
          const double p = static_cast<double>(rx[r * sh.in + k]) * rw[o * sh.in + k];
          acc += p;
          mag += std::abs(p);
        }
        ASSERT_NEAR(y[r * sh.out + o], acc, 1e-4 * mag + 1e-6)
            << sh.rows << "x" << sh.in << "x" << sh.out << " at " << r << "," << o;
      }
    }
  }
}

TEST_F(CudaTest, LogprobsMatchReference) {
  const int32_t V = 1000;
  auto logits = RandomNonZero(3 * V, 17, 0.05f, 10.0f);
  const std::vector<int32_t> rows = {0, 2, 2, 1}, targets = {5, 0, 999, 500};
  std::vector<float> got;
  ASSERT_TRUE(cuda::check::Logprobs(logits, V, rows, targets, &got).ok());
  for (size_t i = 0; i < rows.size(); ++i) {
    const float* r = &logits[rows[i] * V];
    const double mx = *std::max_element(r, r + V);
    double sum = 0;
    for (int32_t v = 0; v < V; ++v) sum += std::exp(r[v] - mx);
    ASSERT_NEAR(got[i], r[targets[i]] - (mx + std::log(sum)), 1e-4) << i;
  }
}

// The compact-row kernel against the host's selection: ids and logits bitwise (no
// arithmetic), the log-sum-exp within 2e-5 relative (float sums).
TEST_F(CudaTest, TopLogitsMatchHostSelection) {
  for (int32_t V : {1000, 128256}) {
    std::vector<float> logits = RandomNonZero(4 * static_cast<size_t>(V), 23, 0.01f, 12.0f);
    for (int32_t i = 0; i < V; i += 97) logits[2 * V + i] = 11.5f;  // ties across the cut
    for (int32_t i = 0; i < V; ++i) logits[3 * V + i] -= 60.0f;     // all negative
    const std::vector<int32_t> rows = {0, 2, 2, 1, 3}, ns = {1, 40, 64, 7, 64};
    std::vector<std::vector<int32_t>> ids;
    std::vector<std::vector<float>> tops;
    std::vector<float> lse;
    ASSERT_TRUE(cuda::check::TopLogits(logits, V, rows, ns, &ids, &tops, &lse).ok());
    for (size_t i = 0; i < rows.size(); ++i) {
      const absl::Span<const float> row(&logits[static_cast<size_t>(rows[i]) * V], V);
      std::vector<engine::TopLogit> want;
      engine::SelectTopLogits(row, ns[i], &want);
      for (int32_t j = 0; j < ns[i]; ++j) {
        ASSERT_EQ(ids[i][j], want[j].id) << "V=" << V << " entry " << i << " rank " << j;
        ASSERT_EQ(tops[i][j], want[j].logit) << "V=" << V << " entry " << i << " rank " << j;
      }
      const float ref = engine::LogSumExp(row);
      EXPECT_NEAR(lse[i], ref, 2e-5f * std::max(1.0f, std::abs(ref))) << "V=" << V << " " << i;
    }
  }
}

// The row-sampling kernel against the host reference (engine::SampleRowReference): the
// same token for nearly every row (the device's expf / logf may differ from glibc's in
// the last bit, which can flip a near tie of the race or of the top-p cut), the drawn
// token's logit exactly.
TEST_F(CudaTest, SampleRowsMatchTheReference) {
  const int32_t V = 32000;
  const int32_t R = 200;
  std::vector<float> logits = RandomNonZero(static_cast<size_t>(R) * V, 31, 0.01f, 6.0f);
  std::vector<int32_t> rows(R);
  std::vector<engine::RowSampling> params(R);
  for (int32_t r = 0; r < R; ++r) {
    rows[r] = r;
    params[r].temperature = 0.5f + 0.01f * r;
    params[r].top_p = r % 3 == 0 ? 1.0f : 0.5f + 0.002f * r;
    params[r].min_p = r % 4 == 0 ? 0.05f : 0.0f;
    params[r].seed = 1000 + r;
    params[r].draw = r % 7;
  }
  std::vector<int32_t> tokens;
  std::vector<float> token_logits;
  ASSERT_TRUE(cuda::check::SampleRows(logits, V, rows, params, &tokens, &token_logits).ok());
  int same = 0;
  for (int32_t r = 0; r < R; ++r) {
    const float* row = &logits[static_cast<size_t>(r) * V];
    same += tokens[r] == engine::SampleRowReference(row, V, params[r]);
    ASSERT_GE(tokens[r], 0);
    ASSERT_LT(tokens[r], V);
    EXPECT_EQ(token_logits[r], row[tokens[r]]);
  }
  EXPECT_GE(same, R - 4) << "of " << R << " rows";
}

// ---- Whole steps against the CPU backend. ----

using testing::RoundedWeights;

void ExpectClose(const std::vector<float>& got, const std::vector<float>& want, int32_t V, float k,
                 const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t r = 0; r * V < want.size(); ++r) {
    float mx = 0;
    for (int32_t v = 0; v < V; ++v) mx = std::max(mx, std::abs(want[r * V + v]));
    double sum = 0;
    for (int32_t v = 0; v < V; ++v) {
      const float d = std::abs(got[r * V + v] - want[r * V + v]);
      sum += d;
      ASSERT_LE(d, k * 0.05f * mx) << what << " row " << r << " id " << v;
    }
    EXPECT_LE(sum / V, k * 0.01 * mx) << what << " row " << r << " mean difference";
  }
}

// Step 1: prefill A (21 tokens, blocks 0-1). Step 2: B and C reuse A's prefix (all of
// block 0, resp. its first 8 slots) with new tokens at fractional positions, while A
// decodes. Steps 3..: all three decode. Both backends see the same plans (the CPU's
// greedy tokens), and every step's logits and logprobs are compared.
void CompareWithCpu(engine::Backend& gpu, engine::Backend& cpu, int32_t vocab, float k) {
  auto run = [&](const engine::BatchPlan& plan, const std::string& what,
                 engine::ForwardOutput* want) {
    engine::ForwardOutput got;
    absl::Status st = cpu.Forward(plan, want);
    ASSERT_TRUE(st.ok()) << st;
    st = gpu.Forward(plan, &got);
    ASSERT_TRUE(st.ok()) << st;
    ExpectClose(got.logits, want->logits, vocab, k, what);
    ASSERT_EQ(got.logprobs.size(), want->logprobs.size());
    for (size_t i = 0; i < got.logprobs.size(); ++i) {
      EXPECT_NEAR(got.logprobs[i], want->logprobs[i],
                  k * (0.05 * std::abs(want->logprobs[i]) + 0.05))
          << what << " logprob " << i;
    }
  };
  auto argmax = [&](const std::vector<float>& l, int32_t row) {
    auto b = l.begin() + static_cast<size_t>(row) * vocab;
    return static_cast<int32_t>(std::max_element(b, b + vocab) - b);
  };
  const int32_t bs = 16;
  engine::BatchPlan p;
  const int32_t nA = 21;
  for (int32_t i = 0; i < nA; ++i) {
    p.tokens.push_back(3 + (i * 37) % (vocab - 3));
    p.positions.push_back(static_cast<float>(i));
    p.kv_slots.push_back({i / bs, i % bs});
  }
  p.seqs.push_back({1, {}, 0, nA});
  p.logits_for = {nA - 1, 3, 15};
  p.logprobs = {{0, p.tokens[1]}, {nA - 1, 7}};
  engine::ForwardOutput want;
  run(p, "prefill A", &want);
  int32_t next_a = argmax(want.logits, 0);

  // Sequences: A (context blocks 0 [16] + 1 [5]), B (block 0 + 4 new in block 2),
  // C (block 0 slots 0..7 + 6 new in block 3).
  struct S {
    int64_t id;
    std::vector<engine::KvSegment> ctx;
    std::vector<engine::KvSlot> next_slots;
    std::vector<int32_t> tokens;
    std::vector<float> pos;
  };
  std::vector<S> seqs(3);
  seqs[0] = {1, {{0, 0, 16}, {1, 0, 5}}, {{1, 5}}, {next_a}, {21.0f}};
  seqs[1] = {2,
             {{0, 0, 16}},
             {{2, 0}, {2, 1}, {2, 2}, {2, 3}},
             {40, 41, 42, 43},
             {16.5f, 17.5f, 18.5f, 19.5f}};
  seqs[2] = {3,
             {{0, 0, 8}},
             {{3, 0}, {3, 1}, {3, 2}, {3, 3}, {3, 4}, {3, 5}},
             {50, 51, 52, 53, 54, 55},
             {8.25f, 9.25f, 10.25f, 11.25f, 12.25f, 13.25f}};
  std::vector<int32_t> fill = {6, 4, 6};  // next free slot in each sequence's last block
  std::vector<int32_t> last_block = {1, 2, 3};
  std::vector<float> last_pos = {21.0f, 19.5f, 13.25f};
  for (int step = 0; step < 6; ++step) {
    engine::BatchPlan plan;
    for (size_t s = 0; s < seqs.size(); ++s) {
      engine::SeqPlan sp;
      sp.id = seqs[s].id;
      sp.context = seqs[s].ctx;
      sp.token_begin = plan.num_tokens();
      sp.num_tokens = static_cast<int32_t>(seqs[s].tokens.size());
      for (size_t j = 0; j < seqs[s].tokens.size(); ++j) {
        plan.tokens.push_back(seqs[s].tokens[j]);
        plan.positions.push_back(seqs[s].pos[j]);
        plan.kv_slots.push_back(seqs[s].next_slots[j]);
      }
      plan.seqs.push_back(sp);
      plan.logits_for.push_back(plan.num_tokens() - 1);
    }
    plan.logits_for.push_back(1);  // a middle token of B's prefill (or B's decode)
    plan.logprobs = {{0, 9}, {plan.num_tokens() - 1, 100}};
    run(plan, "step " + std::to_string(step), &want);
    // Next step: every sequence decodes its greedy token.
    for (size_t s = 0; s < seqs.size(); ++s) {
      S& q = seqs[s];
      // Its new tokens join the context (block by block).
      for (const engine::KvSlot& sl : q.next_slots) {
        if (!q.ctx.empty() && q.ctx.back().block == sl.block &&
            q.ctx.back().first_slot + q.ctx.back().length == sl.slot) {
          ++q.ctx.back().length;
        } else {
          q.ctx.push_back({sl.block, sl.slot, 1});
        }
      }
      q.tokens = {argmax(want.logits, static_cast<int32_t>(s))};
      last_pos[s] += 1.0f;
      q.pos = {last_pos[s]};
      if (fill[s] == bs) {
        last_block[s] += 3;  // blocks 4, 5, 6 (distinct per sequence)
        fill[s] = 0;
      }
      q.next_slots = {{last_block[s], fill[s]++}};
    }
  }
}

TEST_F(CudaTest, ForwardMatchesCpuBackend) {
  for (const std::string& dir : {testing::Stories260kDir(), std::string()}) {
    auto model = engine::LoadModelBundle(dir);
    ASSERT_TRUE(model.ok()) << model.status();
    engine::BackendOptions opts;
    opts.kv_num_blocks = 32;
    engine::cpu::CpuBackend cpu(opts);
    const auto rounded = RoundedWeights(*model->weights);
    ASSERT_TRUE(cpu.Load(model->config, *rounded, engine::Shard{}).ok());
    cuda::CudaBackend gpu(opts, {}, 0);
    absl::Status st = gpu.Load(model->config, *model->weights, engine::Shard{});
    ASSERT_TRUE(st.ok()) << st;
    EXPECT_EQ(gpu.name(), "cuda");
    EXPECT_EQ(gpu.compute_dtype(), "bfloat16");
    EXPECT_EQ(gpu.kv().num_blocks, 32);
    SCOPED_TRACE(dir.empty() ? "built-in model" : "stories260k");
    CompareWithCpu(gpu, cpu, model->config.vocab_size, dir.empty() ? 3.0f : 1.0f);
  }
}

// A CUDA backend on device 0 with `blocks` KV blocks, loaded with `model`; null on error.
std::unique_ptr<cuda::CudaBackend> LoadedGpu(const engine::ModelBundle& model, int32_t blocks,
                                             bool cuda_graphs = true) {
  engine::BackendOptions opts;
  opts.kv_num_blocks = blocks;
  cuda::CudaOptions copts;
  copts.graphs = cuda_graphs;
  auto gpu = std::make_unique<cuda::CudaBackend>(opts, copts, 0);
  absl::Status st = gpu->Load(model.config, *model.weights, engine::Shard{});
  EXPECT_TRUE(st.ok()) << st;
  return st.ok() ? std::move(gpu) : nullptr;
}

TEST_F(CudaTest, BadPlansAreRejected) {
  auto model = engine::LoadModelBundle(testing::Stories260kDir());
  ASSERT_TRUE(model.ok());
  auto gpu_ptr = LoadedGpu(*model, 4);
  ASSERT_NE(gpu_ptr, nullptr);
  cuda::CudaBackend& gpu = *gpu_ptr;
  engine::BatchPlan plan;
  plan.tokens = {1};
  plan.positions = {0};
  plan.kv_slots = {{4, 0}};  // block 4 of 4
  plan.seqs.push_back({1, {}, 0, 1});
  engine::ForwardOutput out;
  EXPECT_EQ(gpu.Forward(plan, &out).code(), absl::StatusCode::kInvalidArgument);
}

// One sequence prefilling `tokens` from position 0 in blocks of 16; no logits asked.
engine::BatchPlan OneSequencePlan(const std::vector<int32_t>& tokens) {
  engine::BatchPlan plan;
  for (size_t i = 0; i < tokens.size(); ++i) {
    plan.tokens.push_back(tokens[i]);
    plan.positions.push_back(static_cast<float>(i));
    plan.kv_slots.push_back({static_cast<int32_t>(i / 16), static_cast<int32_t>(i % 16)});
  }
  plan.seqs.push_back({1, {}, 0, static_cast<int32_t>(tokens.size())});
  return plan;
}

TEST_F(CudaTest, GoldenTeacherForcedAndFirstStep) {
  auto model = engine::LoadModelBundle(testing::Stories260kDir());
  ASSERT_TRUE(model.ok());
  auto gpu_ptr = LoadedGpu(*model, 64);
  ASSERT_NE(gpu_ptr, nullptr);
  cuda::CudaBackend& gpu = *gpu_ptr;
  const int32_t V = model->config.vocab_size;
  auto golden = testing::ReadJson(testing::Stories260kDir() + "/golden.json");
  for (const auto& c : golden["generation"]) {
    const auto prompt = c["prompt_ids"].get<std::vector<int32_t>>();
    const auto completion = c["completion_ids"].get<std::vector<int32_t>>();
    std::vector<int32_t> all = prompt;
    all.insert(all.end(), completion.begin(), completion.end() - 1);
    engine::BatchPlan plan = OneSequencePlan(all);
    for (size_t k = 0; k < completion.size(); ++k) {
      plan.logits_for.push_back(static_cast<int32_t>(prompt.size() - 1 + k));
    }
    engine::ForwardOutput out;
    absl::Status st = gpu.Forward(plan, &out);
    ASSERT_TRUE(st.ok()) << st;
    int exact = 0;
    for (size_t k = 0; k < completion.size(); ++k) {
      const float* row = &out.logits[k * V];
      const float mx = *std::max_element(row, row + V);
      float scale = 0;
      for (int32_t v = 0; v < V; ++v) scale = std::max(scale, std::abs(row[v]));
      exact += row[completion[k]] == mx;
      EXPECT_LE(mx - row[completion[k]], 0.05f * scale) << c["name"] << " step " << k;
    }
    std::printf("%s: golden token is the GPU argmax at %d of %zu teacher-forced steps\n",
                c["name"].get<std::string>().c_str(), exact, completion.size());
    // First step top-5 against golden.json's float32 logits.
    const float* row = &out.logits[0];
    float scale = 0;
    for (int32_t v = 0; v < V; ++v) scale = std::max(scale, std::abs(row[v]));
    for (const auto& e : c["first_step_top5"]) {
      const int32_t id = e["id"];
      EXPECT_NEAR(row[id], e["logit"].get<double>(), 0.05 * scale) << c["name"] << " id " << id;
    }
  }
}

// Where a greedy run leaves the golden (float32) tokens, the golden token must have
// been a near-tie on the GPU at that step: bf16 weights and KV move logits by up to ~1%
// of the row's largest |logit| (GoldenTeacherForcedAndFirstStep), and stories260k's
// golden runs have top-2 gaps down to 0.4%. Returns (max - logit[golden]) / max|logit|
// at step k, teacher-forced on the golden prefix.
float GoldenGapAt(cuda::CudaBackend& gpu, int32_t vocab, const std::vector<int32_t>& prompt,
                  const std::vector<int32_t>& golden, size_t k) {
  std::vector<int32_t> all = prompt;
  all.insert(all.end(), golden.begin(), golden.begin() + static_cast<std::ptrdiff_t>(k));
  engine::BatchPlan plan = OneSequencePlan(all);
  plan.logits_for.push_back(static_cast<int32_t>(all.size() - 1));
  engine::ForwardOutput out;
  if (!gpu.Forward(plan, &out).ok()) return 1e9f;
  const float* row = out.logits.data();
  const float mx = *std::max_element(row, row + vocab);
  float scale = 0;
  for (int32_t v = 0; v < vocab; ++v) scale = std::max(scale, std::abs(row[v]));
  return (mx - row[golden[k]]) / scale;
}

TEST_F(CudaTest, GoldenGreedyThroughTheEngine) {
  auto model = engine::LoadModelBundle(testing::Stories260kDir());
  ASSERT_TRUE(model.ok());
  auto golden = testing::ReadJson(testing::Stories260kDir() + "/golden.json");
  std::vector<std::vector<int32_t>> runs[2];  // [graphs][case]
  for (bool graphs : {true, false}) {
    SCOPED_TRACE(graphs ? "CUDA graphs on" : "CUDA graphs off");
    auto gpu_ptr = LoadedGpu(*model, 64, graphs);
    ASSERT_NE(gpu_ptr, nullptr);
    cuda::CudaBackend& gpu = *gpu_ptr;
    engine::Engine eng(engine::EngineOptions{}, model->config, model->tokenizer.get(), &gpu);
    eng.Start();
    for (const auto& c : golden["generation"]) {
      auto r = testing::RunRequest(
          eng, testing::GreedyRequest(c["prompt_ids"].get<std::vector<int32_t>>(),
                                      c["max_new_tokens"].get<int32_t>()));
      ASSERT_TRUE(r.status.ok()) << r.status;
      runs[graphs].push_back(r.tokens);
    }
    eng.Shutdown(absl::Seconds(1));
    const cuda::CudaBackend::GraphStats gs = gpu.graph_stats();
    if (graphs) {
      EXPECT_TRUE(gs.enabled);
      EXPECT_GT(gs.replays, 0);
      std::printf(
          "cuda graphs: golden greedy through the engine: %lld decode steps replayed, "
          "%d graph(s), %.1f MiB\n",
          static_cast<long long>(gs.replays), gs.graphs, gs.device_bytes / 1048576.0);
    } else {
      EXPECT_FALSE(gs.enabled);
      EXPECT_EQ(gs.replays, 0);
      // Against golden (checked once: graphs on and off must agree exactly, below).
      size_t i = 0;
      for (const auto& c : golden["generation"]) {
        const auto want = c["completion_ids"].get<std::vector<int32_t>>();
        const std::vector<int32_t>& got = runs[graphs][i++];
        ASSERT_EQ(got.size(), want.size()) << c["name"];
        const size_t k = static_cast<size_t>(
            std::mismatch(got.begin(), got.end(), want.begin()).first - got.begin());
        if (k == want.size()) {
          std::printf("%s: greedy == golden for all %zu tokens\n",
                      c["name"].get<std::string>().c_str(), want.size());
          continue;
        }
        const float gap = GoldenGapAt(gpu, model->config.vocab_size,
                                      c["prompt_ids"].get<std::vector<int32_t>>(), want, k);
        std::printf("%s: greedy == golden for %zu of %zu tokens, then a near-tie (gap %.4f)\n",
                    c["name"].get<std::string>().c_str(), k, want.size(), gap);
        EXPECT_LE(gap, 0.02f) << c["name"] << ": left golden at token " << k
                              << " where golden's token was not a near-tie";
      }
    }
  }
  EXPECT_EQ(runs[true], runs[false]) << "CUDA graphs changed the greedy tokens";
}

// Private mode: the blocks a request used read back as zeros once it finished
// (cudaMemsetAsync on the backend's stream), and hold its keys and values without it.
TEST_F(CudaTest, PrivateModeZeroesFreedBlocks) {
  auto model = engine::LoadModelBundle(testing::Stories260kDir());
  ASSERT_TRUE(model.ok());
  const auto prompt = model->tokenizer->Encode("Once upon a time, there was a little girl", true);
  for (bool private_mode : {false, true}) {
    SCOPED_TRACE(private_mode ? "private" : "control");
    auto gpu = LoadedGpu(*model, 16, /*graphs=*/false);
    ASSERT_NE(gpu, nullptr);
    engine::EngineOptions eo;
    eo.private_mode = private_mode;
    engine::Engine eng(eo, model->config, model->tokenizer.get(), gpu.get());
    eng.Start();
    const auto r = testing::RunRequest(eng, testing::GreedyRequest(prompt, 24));
    ASSERT_TRUE(r.status.ok()) << r.status;
    eng.Shutdown(absl::ZeroDuration());
    int32_t nonzero = 0;
    for (engine::BlockId b = 0; b < gpu->kv().num_blocks; ++b) {
      absl::StatusOr<std::vector<uint8_t>> bytes = gpu->KvBlockBytes(b);
      ASSERT_TRUE(bytes.ok()) << bytes.status();
      nonzero += std::any_of(bytes->begin(), bytes->end(), [](uint8_t c) { return c != 0; });
    }
    if (private_mode) {
      EXPECT_EQ(nonzero, 0);
    } else {
      EXPECT_GT(nonzero, 0);
    }
  }
}

// ---- CUDA graphs of decode steps. ----

// The decode layout (graphs): every piece of the step's metadata where
// cuda/step_meta.h says, each token's tile pointing at its keys. Runs without a GPU.
TEST(CudaGraphMeta, PackDecodeMetaKeepsEveryTokensKeys) {
  const int32_t bs = 16;
  engine::BatchPlan p;
  const std::vector<std::vector<engine::KvSegment>> ctx = {
      {{0, 0, 16}, {1, 0, 5}}, {}, {{0, 0, 8}, {2, 0, 16}, {3, 0, 1}}};
  const std::vector<engine::KvSlot> slots = {{1, 5}, {4, 0}, {3, 1}};
  for (int32_t s = 0; s < 3; ++s) {
    p.seqs.push_back({s + 1, ctx[s], s, 1});
    p.tokens.push_back(10 + s);
    p.positions.push_back(0.5f + s);
    p.kv_slots.push_back(slots[s]);
  }
  p.logits_for = {0, 1, 2};
  ASSERT_TRUE(engine::ValidatePlan(p, engine::KvPoolInfo{8, bs, 0, "float32"}, 100).ok());
  absl::StatusOr<cuda::StepMeta> m = cuda::BuildStepMeta(p, bs, 16);
  ASSERT_TRUE(m.ok()) << m.status();
  const int32_t T = 3;
  std::vector<int32_t> w(cuda::DecodeMetaWords(*m, T), -7);
  ASSERT_EQ(w.size(), 8u * T + 21 + 0 + 25 + T);
  ASSERT_TRUE(cuda::PackDecodeMeta(*m, T, w.data()).ok());
  const cuda::DecodeLayout l = cuda::DecodeMetaLayout(T);
  for (int32_t t = 0; t < T; ++t) {
    EXPECT_EQ(w[t], p.tokens[t]);
    float pos;
    std::memcpy(&pos, &w[l.off_pos + t], sizeof(float));
    EXPECT_EQ(pos, p.positions[t]);
    EXPECT_EQ(w[l.off_slots + t], slots[t].block * bs + slots[t].slot);
    cuda::AttnTile tile;
    std::memcpy(&tile, &w[l.off_tiles + 5 * t], sizeof(tile));
    EXPECT_EQ(tile.tok0, t);
    EXPECT_EQ(tile.i0, 0);
    EXPECT_EQ(tile.ntok, 1);
    std::vector<int32_t> want;
    for (const engine::KvSegment& g : ctx[t]) {
      for (int32_t i = 0; i < g.length; ++i) want.push_back(g.block * bs + g.first_slot + i);
    }
    EXPECT_EQ(tile.ctx_len, static_cast<int32_t>(want.size())) << t;
    want.push_back(slots[t].block * bs + slots[t].slot);
    ASSERT_LE(l.off_keys + tile.key_off + want.size(), w.size());
    const std::vector<int32_t> got(w.begin() + l.off_keys + tile.key_off,
                                   w.begin() + l.off_keys + tile.key_off + want.size());
    EXPECT_EQ(got, want) << "token " << t;
  }
  // Not decode steps: a sequence with two new tokens.
  engine::BatchPlan q = p;
  q.seqs[2].num_tokens = 2;
  q.seqs.back().context.clear();
  q.tokens.push_back(1);
  q.positions.push_back(0);
  q.kv_slots.push_back({5, 0});
  ASSERT_TRUE(engine::ValidatePlan(q, engine::KvPoolInfo{8, bs, 0, "float32"}, 100).ok());
  absl::StatusOr<cuda::StepMeta> mq = cuda::BuildStepMeta(q, bs, 16);
  ASSERT_TRUE(mq.ok());
  std::vector<int32_t> wq(cuda::DecodeMetaWords(*mq, q.num_tokens()));
  EXPECT_EQ(cuda::PackDecodeMeta(*mq, q.num_tokens(), wq.data()).code(),
            absl::StatusCode::kInvalidArgument);
}

constexpr int32_t kSimBlock = 16;

// A sequence of a synthetic batch: an optional shared prefix (cached segments it only
// reads), then its own tokens from slot 0 of block `base_block` on.
struct SimSeq {
  int64_t id = 0;
  std::vector<engine::KvSegment> prefix;
  int32_t prefix_len = 0;
  int32_t base_block = 0;
  int32_t len = 0;   // own cached tokens
  int32_t next = 0;  // the token it decodes next
};

// Appends q's `tokens` (after its cached ones) to `plan`, with logits for the last.
void AddTokens(engine::BatchPlan& plan, const SimSeq& q, const std::vector<int32_t>& tokens) {
  engine::SeqPlan sp;
  sp.id = q.id;
  sp.context.insert(sp.context.end(), q.prefix.begin(), q.prefix.end());
  for (int32_t done = 0, b = 0; done < q.len; ++b) {
    const int32_t n = std::min(kSimBlock, q.len - done);
    sp.context.push_back({q.base_block + b, 0, n});
    done += n;
  }
  sp.token_begin = plan.num_tokens();
  sp.num_tokens = static_cast<int32_t>(tokens.size());
  for (size_t j = 0; j < tokens.size(); ++j) {
    const int32_t i = q.len + static_cast<int32_t>(j);
    plan.tokens.push_back(tokens[j]);
    plan.positions.push_back(static_cast<float>(q.prefix_len + i));
    plan.kv_slots.push_back({q.base_block + i / kSimBlock, i % kSimBlock});
  }
  plan.seqs.push_back(std::move(sp));
  plan.logits_for.push_back(plan.num_tokens() - 1);
}

int32_t ArgmaxRow(const std::vector<float>& logits, int32_t V, int32_t row) {
  auto b = logits.begin() + static_cast<size_t>(row) * V;
  return static_cast<int32_t>(std::max_element(b, b + V) - b);
}

// Runs `plan` on the backend with graphs (`gr`) and the one without (`eg`); their
// outputs must be bitwise equal, or with !bitwise, each logit within 1e-3 * max|logit|
// of its row. *want gets the eager outputs.
void RunBoth(cuda::CudaBackend& gr, cuda::CudaBackend& eg, const engine::BatchPlan& plan, int32_t V,
             const std::string& what, engine::ForwardOutput* want, bool bitwise = true) {
  engine::ForwardOutput got;
  absl::Status st = eg.Forward(plan, want);
  ASSERT_TRUE(st.ok()) << what << " (graphs off): " << st;
  st = gr.Forward(plan, &got);
  ASSERT_TRUE(st.ok()) << what << " (graphs on): " << st;
  ASSERT_EQ(got.logits.size(), want->logits.size()) << what;
  ASSERT_EQ(got.logprobs.size(), want->logprobs.size()) << what;
  if (bitwise) {
    size_t differ = 0, first = 0;
    for (size_t i = 0; i < got.logits.size(); ++i) {
      if (std::memcmp(&got.logits[i], &want->logits[i], sizeof(float)) != 0 && differ++ == 0) {
        first = i;
      }
    }
    ASSERT_EQ(differ, 0u) << what << ": " << differ << " logits differ, the first at row "
                          << first / V << " id " << first % V << ": " << got.logits[first]
                          << " with graphs, " << want->logits[first] << " without";
    for (size_t i = 0; i < got.logprobs.size(); ++i) {
      ASSERT_EQ(std::memcmp(&got.logprobs[i], &want->logprobs[i], sizeof(float)), 0)
          << what << ": logprob " << i << ": " << got.logprobs[i] << " vs " << want->logprobs[i];
    }
  } else {
    for (size_t r = 0; r * V < got.logits.size(); ++r) {
      float mx = 0;
      for (int32_t v = 0; v < V; ++v) mx = std::max(mx, std::abs(want->logits[r * V + v]));
      for (int32_t v = 0; v < V; ++v) {
        ASSERT_NEAR(got.logits[r * V + v], want->logits[r * V + v], 1e-3f * mx)
            << what << " row " << r << " id " << v;
      }
    }
  }
}

// The same steps on two backends with the same weights, CUDA graphs on and off: every
// decode step's logits are bitwise equal. Batch sizes 1 to 64, contexts of different
// lengths that cross block boundaries, each size's graph replayed again after its
// blocks were prefilled with other tokens (new KV contents, other lengths), and
// prefill, mixed and log-prob steps (eager on both) between graph replays.
TEST_F(CudaTest, DecodeGraphsMatchEagerBitwise) {
  auto model = engine::LoadModelBundle(testing::Stories260kDir());
  ASSERT_TRUE(model.ok());
  const int32_t V = model->config.vocab_size;
  constexpr int32_t kBlocksPerSeq = 8;
  auto gr = LoadedGpu(*model, 64 * kBlocksPerSeq, true);
  auto eg = LoadedGpu(*model, 64 * kBlocksPerSeq, false);
  ASSERT_NE(gr, nullptr);
  ASSERT_NE(eg, nullptr);
  EXPECT_TRUE(gr->graph_stats().enabled);
  EXPECT_FALSE(eg->graph_stats().enabled);
  const std::vector<int32_t> sizes = {1, 2, 3, 8, 17, 64};
  constexpr int kDecodeSteps = 12;
  engine::ForwardOutput want;
  int64_t id = 0;
  std::vector<SimSeq> seqs;
  for (int32_t B : sizes) {
    seqs.assign(B, SimSeq{});
    for (int32_t s = 0; s < B; ++s) {
      seqs[s].id = ++id;
      seqs[s].base_block = s * kBlocksPerSeq;
    }
    for (int round = 0; round < 2; ++round) {
      const std::string at = "B=" + std::to_string(B) + " round " + std::to_string(round);
      engine::BatchPlan pf;
      std::vector<int32_t> n(B);
      for (int32_t s = 0; s < B; ++s) {
        seqs[s].len = 0;
        n[s] = 3 + (s * 7 + round * 11) % 29;
        std::vector<int32_t> toks(n[s]);
        for (int32_t i = 0; i < n[s]; ++i) toks[i] = 1 + (s * 31 + i * 17 + round * 101) % (V - 1);
        AddTokens(pf, seqs[s], toks);
      }
      RunBoth(*gr, *eg, pf, V, at + " prefill", &want);
      if (HasFatalFailure()) return;
      for (int32_t s = 0; s < B; ++s) {
        seqs[s].len = n[s];
        seqs[s].next = ArgmaxRow(want.logits, V, s);
      }
      for (int step = 0; step < kDecodeSteps; ++step) {
        engine::BatchPlan plan;
        for (const SimSeq& q : seqs) AddTokens(plan, q, {q.next});
        RunBoth(*gr, *eg, plan, V, at + " decode " + std::to_string(step), &want);
        if (HasFatalFailure()) return;
        for (int32_t s = 0; s < B; ++s) {
          ++seqs[s].len;
          seqs[s].next = ArgmaxRow(want.logits, V, s);
        }
      }
    }
  }
  // Per size: the first decode step runs eagerly (warm-up), every later one replays the
  // graph captured at the second.
  cuda::CudaBackend::GraphStats gs = gr->graph_stats();
  const int64_t per_size = 2 * kDecodeSteps - 1;
  EXPECT_EQ(gs.captures, static_cast<int64_t>(sizes.size()));
  EXPECT_EQ(gs.graphs, static_cast<int32_t>(sizes.size()));
  EXPECT_EQ(gs.replays, per_size * static_cast<int64_t>(sizes.size()));
  EXPECT_EQ(eg->graph_stats().replays, 0);
  std::printf(
      "cuda graphs: %lld decode steps replayed bitwise equal to eager steps (batch "
      "1..64), %d graphs, %.1f MiB\n",
      static_cast<long long>(gs.replays), gs.graphs, gs.device_bytes / 1048576.0);

  // The 64 sequences of the last size go on. A mixed step (7 decode, 1 prefill chunk of
  // 5) and a decode step with log-probabilities run eagerly on both.
  auto decode_plan = [&] {
    engine::BatchPlan plan;
    for (const SimSeq& q : seqs) AddTokens(plan, q, {q.next});
    return plan;
  };
  auto advance = [&](const engine::BatchPlan& plan) {
    for (size_t s = 0; s < seqs.size(); ++s) seqs[s].len += plan.seqs[s].num_tokens;
  };
  {
    engine::BatchPlan plan;
    for (int32_t s = 0; s < 8; ++s) {
      AddTokens(plan, seqs[s],
                s == 7 ? std::vector<int32_t>{5, 6, 7, 8, 9} : std::vector<int32_t>{seqs[s].next});
    }
    RunBoth(*gr, *eg, plan, V, "mixed step", &want);
    if (HasFatalFailure()) return;
    for (int32_t s = 0; s < 8; ++s) {
      seqs[s].len += plan.seqs[s].num_tokens;
      seqs[s].next = ArgmaxRow(want.logits, V, s);
    }
  }
  seqs.resize(8);  // one size (8) whose graph exists
  {
    engine::BatchPlan plan = decode_plan();
    plan.logprobs = {{0, 5}, {3, 9}, {7, 100}};
    RunBoth(*gr, *eg, plan, V, "decode step with logprobs", &want);
    if (HasFatalFailure()) return;
    advance(plan);
    for (int32_t s = 0; s < 8; ++s) seqs[s].next = ArgmaxRow(want.logits, V, s);
  }
  EXPECT_EQ(gr->graph_stats().replays, gs.replays);  // nothing replayed so far
  // Graph replays that pick rows: reversed, a subset with a repeat, none.
  const std::vector<std::vector<int32_t>> picks = {{7, 6, 5, 4, 3, 2, 1, 0}, {2, 5, 5, 6}, {}};
  for (const std::vector<int32_t>& pick : picks) {
    engine::BatchPlan plan = decode_plan();
    plan.logits_for = pick;
    RunBoth(*gr, *eg, plan, V, "decode step with " + std::to_string(pick.size()) + " rows", &want,
            /*bitwise=*/false);
    if (HasFatalFailure()) return;
    advance(plan);  // the same tokens are fed again: only the KV contents matter
  }
  {
    engine::BatchPlan plan = decode_plan();
    RunBoth(*gr, *eg, plan, V, "decode step after the others", &want);
    if (HasFatalFailure()) return;
  }
  EXPECT_EQ(gr->graph_stats().replays, gs.replays + static_cast<int64_t>(picks.size()) + 1);
  EXPECT_EQ(gr->graph_stats().captures, gs.captures);

  // set_cuda_graphs(false): eager, bitwise the same.
  gr->set_cuda_graphs(false);
  EXPECT_FALSE(gr->graph_stats().enabled);
  RunBoth(*gr, *eg, decode_plan(), V, "decode step, graphs switched off", &want);
  EXPECT_EQ(gr->graph_stats().replays, gs.replays + static_cast<int64_t>(picks.size()) + 1);
}

// A scoring step of more logits rows than one LM-head chunk (256): 500 prompt tokens,
// whole and compact rows for every third token, a log-probability for every token (the
// rows of both interleave across the chunks), against the CPU backend (tolerances of
// ForwardMatchesCpuBackend) and, for compact rows, against the GPU's own whole rows.
TEST_F(CudaTest, ManyLogitsRowsGoThroughTheHeadInChunks) {
  auto model = engine::LoadModelBundle(testing::Stories260kDir());
  ASSERT_TRUE(model.ok());
  const int32_t V = model->config.vocab_size;
  engine::BackendOptions opts;
  opts.kv_num_blocks = 40;
  engine::cpu::CpuBackend cpu(opts);
  const auto rounded = RoundedWeights(*model->weights);
  ASSERT_TRUE(cpu.Load(model->config, *rounded, engine::Shard{}).ok());
  cuda::CudaBackend gpu(opts, {}, 0);
  ASSERT_TRUE(gpu.Load(model->config, *model->weights, engine::Shard{}).ok());
  SimSeq q;
  q.id = 1;
  std::vector<int32_t> toks;
  for (int32_t i = 0; i < 500; ++i) toks.push_back(1 + (i * 37) % (V - 1));
  engine::BatchPlan plan;
  AddTokens(plan, q, toks);
  plan.logits_for.clear();
  for (int32_t i = 2; i < 500; i += 3) plan.logits_for.push_back(i);
  for (int32_t i = 0; i + 1 < 500; ++i) plan.logprobs.push_back({499 - i, toks[(i * 7) % 500]});
  engine::ForwardOutput want, got;
  ASSERT_TRUE(cpu.Forward(plan, &want).ok());
  ASSERT_TRUE(gpu.Forward(plan, &got).ok());
  ExpectClose(got.logits, want.logits, V, 1.0f, "whole rows");
  ASSERT_EQ(got.logprobs.size(), want.logprobs.size());
  for (size_t i = 0; i < want.logprobs.size(); ++i) {
    ASSERT_NEAR(got.logprobs[i], want.logprobs[i], 0.05 * std::abs(want.logprobs[i]) + 0.05)
        << "logprob " << i;
  }
  // The same step again (same K/V written) with every other row compact.
  engine::ForwardOutput compact;
  plan.logits_top.assign(plan.logits_for.size(), 0);
  for (size_t i = 0; i < plan.logits_top.size(); i += 2) plan.logits_top[i] = 1 + i % 64;
  ASSERT_TRUE(gpu.Forward(plan, &compact).ok());
  std::vector<engine::TopLogit> want_top;
  size_t whole = 0;
  for (size_t i = 0; i < plan.logits_for.size(); ++i) {
    const absl::Span<const float> row(&got.logits[i * V], V);
    if (plan.logits_top[i] == 0) {
      ASSERT_TRUE(std::equal(row.begin(), row.end(), compact.logits.begin() + whole * V)) << i;
      ++whole;
    } else {
      engine::SelectTopLogits(row, plan.logits_top[i], &want_top);
    }
  }
  ASSERT_EQ(compact.logits.size(), whole * V);
  ASSERT_EQ(compact.top.size(), want_top.size());
  for (size_t i = 0; i < want_top.size(); ++i) ASSERT_EQ(compact.top[i], want_top[i]) << i;
  EXPECT_EQ(compact.logprobs, got.logprobs);
}

// Compact rows from Forward, eager and from CUDA graphs: the same step asked for whole
// rows and for compact ones (a step rerun with the same tokens writes the same K/V, so
// its logits are the same) gives SelectTopLogits of the whole rows, bitwise, and the
// whole rows it still asks for unchanged.
TEST_F(CudaTest, CompactRowsMatchWholeRows) {
  auto model = engine::LoadModelBundle(testing::Stories260kDir());
  ASSERT_TRUE(model.ok());
  const int32_t V = model->config.vocab_size;
  for (bool graphs : {false, true}) {
    auto gpu = LoadedGpu(*model, 64, graphs);
    ASSERT_NE(gpu, nullptr);
    std::vector<SimSeq> seqs(6);
    engine::BatchPlan pf;
    for (int32_t s = 0; s < 6; ++s) {
      seqs[s].id = s + 1;
      seqs[s].base_block = 4 * s;
      std::vector<int32_t> toks;
      for (int32_t i = 0; i < 5 + 3 * s; ++i) toks.push_back(1 + (s * 37 + i * 11) % (V - 1));
      AddTokens(pf, seqs[s], toks);
    }
    auto check = [&](engine::BatchPlan plan, const std::string& what) {
      engine::ForwardOutput whole, compact;
      ASSERT_TRUE(gpu->Forward(plan, &whole).ok()) << what;
      ASSERT_EQ(whole.logits.size(), plan.logits_for.size() * V) << what;
      plan.logits_top.assign(plan.logits_for.size(), 0);
      const int32_t ns[] = {1, 0, 40, 64, 0, 7};
      for (size_t r = 0; r < plan.logits_top.size(); ++r) plan.logits_top[r] = ns[r % 6];
      ASSERT_TRUE(gpu->Forward(plan, &compact).ok()) << what;
      std::vector<engine::TopLogit> want_top;
      std::vector<float> want_whole, want_lse;
      for (size_t r = 0; r < plan.logits_for.size(); ++r) {
        const absl::Span<const float> row(&whole.logits[r * V], V);
        if (plan.logits_top[r] == 0) {
          want_whole.insert(want_whole.end(), row.begin(), row.end());
        } else {
          engine::SelectTopLogits(row, plan.logits_top[r], &want_top);
          want_lse.push_back(engine::LogSumExp(row));
        }
      }
      EXPECT_EQ(compact.logits, want_whole) << what;
      ASSERT_EQ(compact.top.size(), want_top.size()) << what;
      for (size_t i = 0; i < want_top.size(); ++i) {
        ASSERT_EQ(compact.top[i], want_top[i]) << what << " entry " << i;
      }
      ASSERT_EQ(compact.top_lse.size(), want_lse.size()) << what;
      for (size_t i = 0; i < want_lse.size(); ++i) {
        EXPECT_NEAR(compact.top_lse[i], want_lse[i], 2e-5f * std::max(1.0f, std::abs(want_lse[i])))
            << what;
      }
    };
    const std::string mode = graphs ? "graphs" : "eager";
    check(pf, mode + " prefill");
    if (HasFatalFailure()) return;
    for (int32_t s = 0; s < 6; ++s) seqs[s].len = 5 + 3 * s;
    for (int step = 0; step < 4; ++step) {  // warm-up, capture, replays
      engine::BatchPlan plan;
      for (const SimSeq& q : seqs)
        AddTokens(plan, q, {1 + (step * 13 + static_cast<int32_t>(q.id)) % (V - 1)});
      check(plan, mode + " decode " + std::to_string(step));
      if (HasFatalFailure()) return;
      for (SimSeq& q : seqs) ++q.len;
    }
    if (graphs) {
      EXPECT_GT(gpu->graph_stats().replays, 0);
    }
  }
}

// Whole decode steps with split-K attention (the default for small batches) against
// the same steps without it: a 480-token context, batch 1 and 3, graphs on and off.
TEST_F(CudaTest, SplitDecodeMatchesUnsplit) {
  auto model = engine::LoadModelBundle(testing::Stories260kDir());
  ASSERT_TRUE(model.ok());
  const int32_t V = model->config.vocab_size;
  for (bool graphs : {false, true}) {
    std::unique_ptr<cuda::CudaBackend> b[2];
    for (int split = 0; split < 2; ++split) {
      engine::BackendOptions opts;
      opts.kv_num_blocks = 3 * 32;
      cuda::CudaOptions copts;
      copts.graphs = graphs;
      copts.split_decode = split == 1;
      b[split] = std::make_unique<cuda::CudaBackend>(opts, copts, 0);
      ASSERT_TRUE(b[split]->Load(model->config, *model->weights, engine::Shard{}).ok());
    }
    for (int32_t B : {1, 3}) {
      std::vector<SimSeq> seqs(B);
      for (int32_t s = 0; s < B; ++s) {
        seqs[s].id = s + 1;
        seqs[s].base_block = 32 * s;
      }
      // Prefill 480 tokens per sequence in chunks of 96 (prefill never splits).
      for (int32_t done = 0; done < 480; done += 96) {
        engine::BatchPlan pf;
        for (SimSeq& q : seqs) {
          std::vector<int32_t> toks;
          for (int32_t i = 0; i < 96; ++i)
            toks.push_back(1 + (q.id * 131 + (done + i) * 7) % (V - 1));
          AddTokens(pf, q, toks);
        }
        engine::ForwardOutput o0, o1;
        ASSERT_TRUE(b[0]->Forward(pf, &o0).ok());
        ASSERT_TRUE(b[1]->Forward(pf, &o1).ok());
        for (SimSeq& q : seqs) q.len += 96;
      }
      for (int step = 0; step < 4; ++step) {
        engine::BatchPlan plan;
        for (const SimSeq& q : seqs)
          AddTokens(plan, q, {1 + (step * 17 + static_cast<int32_t>(q.id)) % (V - 1)});
        engine::ForwardOutput want, got;
        ASSERT_TRUE(b[0]->Forward(plan, &want).ok());
        ASSERT_TRUE(b[1]->Forward(plan, &got).ok());
        ExpectClose(got.logits, want.logits, V, 0.5f,
                    std::string(graphs ? "graphs" : "eager") + " B=" + std::to_string(B) +
                        " step " + std::to_string(step));
        for (SimSeq& q : seqs) ++q.len;
      }
    }
  }
}

// Key lists longer than the graphs' metadata buffer: it grows, every graph is dropped
// and recaptured, and the results stay bitwise equal. 64 sequences share a prefix of
// 1120 cached tokens (70 blocks), so one decode step has 64 x 1121+ keys.
TEST_F(CudaTest, DecodeGraphsSurviveGrowingKeyLists) {
  auto model = engine::LoadModelBundle(testing::Stories260kDir());
  ASSERT_TRUE(model.ok());
  const int32_t V = model->config.vocab_size;
  constexpr int32_t B = 64, kPrefixBlocks = 70, kBlocks = 2 * B + kPrefixBlocks;
  auto gr = LoadedGpu(*model, kBlocks, true);
  auto eg = LoadedGpu(*model, kBlocks, false);
  ASSERT_NE(gr, nullptr);
  ASSERT_NE(eg, nullptr);
  engine::ForwardOutput want;
  std::vector<SimSeq> seqs(B);
  auto run_decode = [&](const std::string& what, int steps) {
    for (int step = 0; step < steps; ++step) {
      engine::BatchPlan plan;
      for (const SimSeq& q : seqs) AddTokens(plan, q, {q.next});
      RunBoth(*gr, *eg, plan, V, what + " decode " + std::to_string(step), &want);
      if (::testing::Test::HasFatalFailure()) return;
      for (int32_t s = 0; s < B; ++s) {
        ++seqs[s].len;
        seqs[s].next = ArgmaxRow(want.logits, V, s);
      }
    }
  };
  auto prefill_own = [&](const std::string& what, int32_t n) {
    engine::BatchPlan pf;
    for (int32_t s = 0; s < B; ++s) {
      seqs[s].len = 0;
      std::vector<int32_t> toks(n);
      for (int32_t i = 0; i < n; ++i) toks[i] = 1 + (s * 13 + i * 7) % (V - 1);
      AddTokens(pf, seqs[s], toks);
    }
    RunBoth(*gr, *eg, pf, V, what + " prefill", &want);
    if (::testing::Test::HasFatalFailure()) return;
    for (int32_t s = 0; s < B; ++s) {
      seqs[s].len = n;
      seqs[s].next = ArgmaxRow(want.logits, V, s);
    }
  };
  for (int32_t s = 0; s < B; ++s) {
    seqs[s].id = s + 1;
    seqs[s].base_block = 2 * s;
  }
  // Short contexts: the graph of batch 64 is captured over the first buffer.
  prefill_own("short", 4);
  ASSERT_FALSE(HasFatalFailure());
  run_decode("short", 3);
  ASSERT_FALSE(HasFatalFailure());
  const cuda::CudaBackend::GraphStats before = gr->graph_stats();
  EXPECT_EQ(before.captures, 1);
  EXPECT_EQ(before.invalidations, 0);

  // The shared prefix: one sequence of 1120 tokens in blocks 128..197.
  SimSeq shared;
  shared.id = 1000;
  shared.base_block = 2 * B;
  std::vector<int32_t> toks(kPrefixBlocks * kSimBlock);
  for (size_t i = 0; i < toks.size(); ++i) toks[i] = 1 + static_cast<int32_t>(i * 37) % (V - 1);
  engine::BatchPlan pf;
  AddTokens(pf, shared, toks);
  RunBoth(*gr, *eg, pf, V, "shared prefix", &want);
  ASSERT_FALSE(HasFatalFailure());
  for (int32_t s = 0; s < B; ++s) {
    seqs[s].prefix.clear();
    for (int32_t b = 0; b < kPrefixBlocks; ++b) seqs[s].prefix.push_back({2 * B + b, 0, kSimBlock});
    seqs[s].prefix_len = kPrefixBlocks * kSimBlock;
  }
  prefill_own("long", 2);
  ASSERT_FALSE(HasFatalFailure());
  run_decode("long", 3);
  ASSERT_FALSE(HasFatalFailure());
  const cuda::CudaBackend::GraphStats after = gr->graph_stats();
  EXPECT_GE(after.invalidations, 1);
  EXPECT_EQ(after.captures, 2);
  EXPECT_EQ(after.graphs, 1);
  EXPECT_EQ(after.replays, before.replays + 3);
  std::printf(
      "cuda graphs: metadata buffer grown %lld time(s) for 64 x %d keys, graphs "
      "recaptured, results bitwise equal\n",
      static_cast<long long>(after.invalidations), kPrefixBlocks * kSimBlock + 3);
}

// The backend with cuda_attention = tensor_core vs simt (built-in model, head_dim 32):
// prefill steps of two sequences (one cut into several tiles, several key tiles), then
// a step mixing a decode token with a prefill chunk over a context. Tolerance as for
// this model against the CPU backend (k = 3): it amplifies bf16 roundings (of q and P
// here) to a few % of max|logit|.
TEST_F(CudaTest, TensorCoreAttentionForwardMatchesSimt) {
  auto model = engine::LoadModelBundle("");
  ASSERT_TRUE(model.ok()) << model.status();
  const int32_t V = model->config.vocab_size;
  std::unique_ptr<cuda::CudaBackend> gpus[2];
  const cuda::CudaAttention modes[2] = {cuda::CudaAttention::kSimt,
                                        cuda::CudaAttention::kTensorCore};
  for (int i = 0; i < 2; ++i) {
    engine::BackendOptions opts;
    opts.kv_num_blocks = 64;
    cuda::CudaOptions copts;
    copts.attention = modes[i];
    gpus[i] = std::make_unique<cuda::CudaBackend>(opts, copts, 0);
    absl::Status st = gpus[i]->Load(model->config, *model->weights, engine::Shard{});
    ASSERT_TRUE(st.ok()) << st;
  }
  EXPECT_EQ(gpus[1]->attention_tile_tokens(),
            64 / (model->config.num_heads / model->config.num_kv_heads));
  SimSeq a, b;
  a.id = 1;
  a.base_block = 0;
  b.id = 2;
  b.base_block = 20;
  auto tokens = [&](int32_t n, int32_t salt) {
    std::vector<int32_t> t(n);
    for (int32_t i = 0; i < n; ++i) t[i] = 1 + (i * 37 + salt * 11) % (V - 1);
    return t;
  };
  engine::BatchPlan p1;
  AddTokens(p1, a, tokens(150, 1));
  AddTokens(p1, b, tokens(37, 2));
  p1.logits_for = {0, 63, 64, 149, 150, 186};
  engine::ForwardOutput want, got;
  ASSERT_TRUE(gpus[0]->Forward(p1, &want).ok());
  ASSERT_TRUE(gpus[1]->Forward(p1, &got).ok());
  ExpectClose(got.logits, want.logits, V, 3.0f, "prefill");
  a.len = 150;
  b.len = 37;
  engine::BatchPlan p2;
  AddTokens(p2, a, {5});
  AddTokens(p2, b, tokens(90, 3));
  p2.logits_for = {0, 1, 45, 90};
  ASSERT_TRUE(gpus[0]->Forward(p2, &want).ok());
  ASSERT_TRUE(gpus[1]->Forward(p2, &got).ok());
  ExpectClose(got.logits, want.logits, V, 3.0f, "decode + prefill chunk");
}

TEST_F(CudaTest, TensorCoreAttentionOptionIsChecked) {
  auto model = engine::LoadModelBundle(testing::Stories260kDir());  // head_dim 8
  ASSERT_TRUE(model.ok());
  engine::BackendOptions opts;
  opts.kv_num_blocks = 4;
  cuda::CudaOptions tc;
  tc.attention = cuda::CudaAttention::kTensorCore;
  cuda::CudaBackend tc_gpu(opts, tc, 0);
  const absl::Status st = tc_gpu.Load(model->config, *model->weights, engine::Shard{});
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(std::string(st.message()).find("--cuda_attention"), std::string::npos) << st;
  cuda::CudaBackend gpu(opts, {}, 0);  // auto: falls back to the SIMT kernel
  ASSERT_TRUE(gpu.Load(model->config, *model->weights, engine::Shard{}).ok());
}

TEST_F(CudaTest, TensorParallelMatchesSingleGpu) {
  if (cuda::CudaDeviceCount() < 2) GTEST_SKIP() << "needs 2 GPUs";
  auto model = engine::LoadModelBundle(testing::Stories260kDir());
  ASSERT_TRUE(model.ok());
  engine::BackendOptions opts;
  opts.kv_num_blocks = 32;
  engine::cpu::CpuBackend cpu(opts);
  const auto rounded = RoundedWeights(*model->weights);
  ASSERT_TRUE(cpu.Load(model->config, *rounded, engine::Shard{}).ok());
  for (int32_t tp : {2, 4}) {
    if (cuda::CudaDeviceCount() < tp) continue;
    engine::BackendOptions tp_opts = opts;
    tp_opts.tensor_parallel = tp;
    auto gpu = cuda::MakeCudaBackend(tp_opts);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    absl::Status st = (*gpu)->Load(model->config, *model->weights, engine::Shard{});
    ASSERT_TRUE(st.ok()) << "tp=" << tp << ": " << st;
    SCOPED_TRACE("tp=" + std::to_string(tp));
    CompareWithCpu(**gpu, cpu, model->config.vocab_size, 1.0f);
  }
}

// The CUDA backend's options, parsed without a GPU: bad values and values the backend
// does not support (a float32 KV cache) fail naming the flag.
TEST(CudaOptionsTest, ParsesAndRejectsNamingTheFlag) {
  auto o = cuda::ParseCudaOptions({});
  ASSERT_TRUE(o.ok());
  EXPECT_EQ(o->attention, cuda::CudaAttention::kAuto);
  EXPECT_TRUE(o->graphs && o->split_decode && o->row_sampling);
  o = cuda::ParseCudaOptions({{"cuda_attention", "simt"},
                              {"cuda_graphs", "false"},
                              {"cuda_split_decode", "false"},
                              {"cuda_row_sampling", "false"},
                              {"kv_cache_dtype", "bfloat16"}});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->attention, cuda::CudaAttention::kSimt);
  EXPECT_FALSE(o->graphs || o->split_decode || o->row_sampling);
  o = cuda::ParseCudaOptions({{"kv_cache_dtype", "float32"}});
  EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(o.status().message().rfind("--kv_cache_dtype: ", 0), 0u) << o.status();
  o = cuda::ParseCudaOptions({{"cuda_attention", "fast"}});
  EXPECT_EQ(o.status().message(),
            "--cuda_attention: unknown value 'fast' (auto, simt, tensor_core)");
  o = cuda::ParseCudaOptions({{"cpu_dtype", "bfloat16"}});
  EXPECT_EQ(o.status().message(), "--cpu_dtype: not an option of the cuda backend");
}

// Which CUDA errors leave the context unusable (no GPU needed): the backend reports those
// through Health; the others fail one call only.
TEST(CudaErrorsTest, StickyErrorsAreClassified) {
  for (cudaError_t e : {cudaErrorIllegalAddress, cudaErrorLaunchFailure, cudaErrorAssert,
                        cudaErrorIllegalInstruction, cudaErrorMisalignedAddress,
                        cudaErrorHardwareStackError, cudaErrorECCUncorrectable}) {
    EXPECT_TRUE(cuda::IsStickyCudaError(e)) << cudaGetErrorName(e);
  }
  for (cudaError_t e : {cudaSuccess, cudaErrorMemoryAllocation, cudaErrorInvalidValue,
                        cudaErrorLaunchOutOfResources, cudaErrorNotReady, cudaErrorNoDevice}) {
    EXPECT_FALSE(cuda::IsStickyCudaError(e)) << cudaGetErrorName(e);
  }
  // The code travels in the status of a failed call.
  const absl::Status st = cuda::CudaStatus(cudaErrorIllegalAddress, "kernel", "file.cc", 1);
  EXPECT_EQ(cuda::CudaErrorOf(st), cudaErrorIllegalAddress);
  EXPECT_NE(std::string(st.message()).find("cudaErrorIllegalAddress"), std::string::npos);
  EXPECT_EQ(cuda::CudaErrorOf(absl::InternalError("cuBLAS error")), cudaSuccess);
  EXPECT_EQ(cuda::CudaErrorOf(absl::OkStatus()), cudaSuccess);
}

// The body of StickyErrorTurnsHealthFailed, in a process of its own (the error poisons
// the CUDA context of the whole process): exits 0 when every expectation holds, else
// prints the first that does not and exits 1.
[[noreturn]] void StickyErrorChild() {
  auto fail = [](const std::string& why) {
    std::fprintf(stderr, "sticky-error child: %s\n", why.c_str());
    std::fflush(stderr);
    std::_Exit(1);
  };
  auto model = engine::LoadModelBundle(testing::Stories260kDir());
  if (!model.ok()) fail(model.status().ToString());
  engine::BackendOptions opts;
  opts.kv_num_blocks = 4;
  cuda::CudaBackend gpu(opts, {}, 0);
  if (absl::Status st = gpu.Load(model->config, *model->weights, engine::Shard{}); !st.ok()) {
    fail("load: " + st.ToString());
  }
  const engine::BatchPlan plan = OneSequencePlan({1, 2, 3});
  engine::ForwardOutput out;
  if (absl::Status st = gpu.Forward(plan, &out); !st.ok()) fail("first step: " + st.ToString());
  if (!gpu.Health().ok()) fail("unhealthy before the fault");
  // A kernel writing far outside any allocation: cudaErrorIllegalAddress, sticky.
  cuda::LaunchFillF32(reinterpret_cast<float*>(uintptr_t{1} << 40), 1 << 20, 0.0f, nullptr);
  cudaDeviceSynchronize();
  const absl::Status step = gpu.Forward(plan, &out);
  if (step.ok()) fail("a step after the fault succeeded");
  const absl::Status health = gpu.Health();
  if (health.code() != absl::StatusCode::kFailedPrecondition) {
    fail("health after the fault: " + health.ToString());
  }
  if (std::string(health.message()).find("sticky") == std::string::npos) {
    fail("health does not say sticky: " + health.ToString());
  }
  // Later steps fail fast with the health status.
  const absl::Status again = gpu.Forward(plan, &out);
  if (again.code() != absl::StatusCode::kFailedPrecondition) {
    fail("a later step: " + again.ToString());
  }
  std::fflush(stderr);
  std::_Exit(0);
}

// A sticky CUDA error (an illegal address) turns Health FAILED_PRECONDITION, so that the
// server reports NOT_SERVING at tp = 1 too; later steps fail at once. Runs in a child
// process (a death test re-executing this binary): the fault poisons the process.
TEST_F(CudaTest, StickyErrorTurnsHealthFailed) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(StickyErrorChild(), ::testing::ExitedWithCode(0), "");
}

#else  // !SUPERPOSE_HAVE_CUDA

TEST_F(CudaTest, BuiltWithoutCuda) {}

#endif

}  // namespace
}  // namespace superpose
