// The sampler against the backend's draw (SampleRowReference: the same token for every
// row and seed) and against the distribution it must sample, its compact-row path
// (SampleTop, LogprobsFromTop) against its whole-row path, and the vectorised row
// passes it is built on.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <numeric>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/backend.h"
#include "engine/row_math.h"
#include "engine/row_sampling.h"
#include "engine/runtime/sampler.h"
#include "tests/simd_targets.h"
#include "tests/truncated_softmax.h"

namespace superpose::engine {
namespace {

// Logits shaped like a language model's: a Gaussian body and a few likely tokens.
std::vector<float> Row(int32_t V, uint32_t seed, float spread = 2.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> body(0.0f, spread);
  std::vector<float> row(V);
  for (float& x : row) x = body(rng);
  for (int i = 0; i < 6; ++i) row[rng() % V] = 6.0f + static_cast<float>(rng() % 40) * 0.25f;
  return row;
}

// Distance in ulps between a float and a double reference (the ulp of the float's
// binade, denormal spacing below the normal range).
double UlpError(float got, double want) {
  const double a = std::fabs(want);
  const double ulp = a < 0x1p-126 ? 0x1p-149 : std::ldexp(1.0, std::ilogb(a) - 23);
  return std::fabs(static_cast<double>(got) - want) / ulp;
}

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// SpExp over (-inf, 0] (and a little above): within 2 ulp of exp in double everywhere,
// exactly rounded denormals within 1 denormal step, 0 from -104 down.
TEST(SpMathTest, ExpIsWithinTwoUlp) {
  double worst = 0.0;
  float worst_at = 0.0f;
  auto check = [&](float z) {
    const double e = UlpError(SpExp(z), std::exp(static_cast<double>(z)));
    if (e > worst) {
      worst = e;
      worst_at = z;
    }
  };
  // The floats of [-104, 0] by their bits (odd strides, so that every last bit pattern
  // is hit), [-1, 0] and [-104, -87] (denormal results) more densely.
  for (uint32_t u = Bits(-0.0f); u <= Bits(-104.0f); u += 251) check(FromBits(u));
  for (uint32_t u = Bits(-0.0f); u <= Bits(-1.0f); u += 509) check(FromBits(u));
  for (uint32_t u = Bits(-87.0f); u <= Bits(-104.0f); u += 3) check(FromBits(u));
  for (float z = 0.0f; z < 88.0f; z += 0.01f) check(z);
  EXPECT_LE(worst, 2.0) << "at " << worst_at;
  std::printf("SpExp: max error %.3f ulp at %.9g\n", worst, worst_at);
  EXPECT_EQ(SpExp(0.0f), 1.0f);
  EXPECT_EQ(SpExp(-0.0f), 1.0f);
  EXPECT_EQ(SpExp(-INFINITY), 0.0f);
  EXPECT_EQ(SpExp(-104.0f), 0.0f);
  EXPECT_EQ(SpExp(-1e30f), 0.0f);
  EXPECT_EQ(SpExp(-103.0f), static_cast<float>(std::exp(-103.0)));  // a denormal
  EXPECT_GT(SpExp(-103.0f), 0.0f);
  EXPECT_EQ(SpExp(89.0f), INFINITY);
  EXPECT_EQ(SpExp(INFINITY), INFINITY);
  EXPECT_EQ(Bits(SpExp(NAN)), 0x7FC00000u);
  EXPECT_EQ(Bits(SpExp(-NAN)), 0x7FC00000u);
}

// SpLog over (0, 1] and (1, FLT_MAX] by their bits (odd strides), and densely near 1: within 2 ulp
// of log in double (its value, not its value's rounding: near 1 the result is tiny).
TEST(SpMathTest, LogIsWithinTwoUlp) {
  double worst = 0.0;
  float worst_at = 0.0f;
  auto check = [&](uint32_t u) {
    const float x = FromBits(u);
    const double e = UlpError(SpLog(x), std::log(static_cast<double>(x)));
    if (e > worst) {
      worst = e;
      worst_at = x;
    }
  };
  for (uint32_t u = 1; u <= Bits(1.0f); u += 253) check(u);
  for (uint32_t u = Bits(1.0f); u < 0x7F800000u; u += 1021) check(u);
  for (uint32_t u = Bits(0.99f); u <= Bits(1.01f); u += 3) check(u);
  for (uint32_t u = Bits(0.70f); u <= Bits(0.71f); u += 3) check(u);  // sqrt(1/2)
  EXPECT_LE(worst, 2.0) << "at " << worst_at;
  std::printf("SpLog: max error %.3f ulp at %.9g\n", worst, worst_at);
  EXPECT_EQ(SpLog(1.0f), 0.0f);
  EXPECT_EQ(SpLog(0.0f), -INFINITY);
  EXPECT_EQ(SpLog(-0.0f), -INFINITY);
  EXPECT_EQ(SpLog(INFINITY), INFINITY);
  EXPECT_EQ(Bits(SpLog(-1.0f)), 0x7FC00000u);
  EXPECT_EQ(Bits(SpLog(-INFINITY)), 0x7FC00000u);
  EXPECT_EQ(Bits(SpLog(NAN)), 0x7FC00000u);
  EXPECT_EQ(SpLog(FromBits(1)), static_cast<float>(std::log(0x1p-149)));
  // The race noise stays finite for every uniform the hash can produce (the largest
  // bits value, 2^24 - 1, comes up once in 2^24 tokens).
  uint64_t key = 0;
  int32_t top = -1;
  for (uint64_t seed = 0; top < 0; ++seed) {
    key = RaceKey(seed, 0);
    for (int32_t i = 0; i < (1 << 20) && top < 0; ++i) {
      if (RaceBits(key, i) == 0xFFFFFFu) top = i;
    }
  }
  EXPECT_LT(RaceUniform(key, top), 1.0f);
  EXPECT_TRUE(std::isfinite(RaceNoiseAt(key, top)));
  EXPECT_GT(RaceNoiseAt(key, top), 16.0f);
}

// Every vector path gives the scalar functions' bits, on random floats (all bit
// patterns: NaNs, infinities, denormals), on the ranges the sampler uses and around
// the edges of the range reductions.
TEST(SpMathTest, VectorPathsGiveTheScalarBits) {
  std::mt19937 rng(17);
  std::vector<float> in;
  for (int i = 0; i < 1 << 21; ++i) in.push_back(FromBits(rng()));
  std::uniform_real_distribution<float> neg(-110.0f, 0.0f), unit(0.0f, 1.0f), noise(0.0f, 18.0f);
  for (int i = 0; i < 1 << 20; ++i) {
    in.push_back(neg(rng));
    in.push_back(unit(rng));
    in.push_back(noise(rng));
  }
  auto around = [&](float v, int ulps) {
    for (int d = -ulps; d <= ulps; ++d) {
      const uint32_t b = Bits(v) + static_cast<uint32_t>(d);
      in.push_back(FromBits(b));
      in.push_back(-FromBits(b));
    }
  };
  for (float v : {0.0f, 1.0f, 104.0f, 103.97f, 87.34f, 89.0f, 88.72f, 0x1p-126f, 0x1p-149f,
                  0.70710677f, 1.41421354f, INFINITY, 16777215.5f}) {
    around(v, 40);
  }
  for (int k = -151; k <= 128; ++k) {  // exp's rounding boundaries (k + 1/2) ln 2
    around(static_cast<float>((k + 0.5) * std::log(2.0)), 8);
  }
  for (int e = -149; e <= 127; ++e) around(std::ldexp(0.70710677f, e), 4);  // log's
  for (uint32_t u = 1; u < 5000; ++u) in.push_back(FromBits(u));            // denormals
  in.push_back(NAN);
  in.push_back(-NAN);
  const int64_t n = static_cast<int64_t>(in.size());  // not a multiple of 16: tails too
  std::vector<float> want_exp(n), want_log(n), got(n);
  for (int64_t i = 0; i < n; ++i) {
    want_exp[i] = SpExp(in[i]);
    want_log[i] = SpLog(in[i]);
  }
  int targets = 0;
  superpose::testing::ForEachSimdTarget([&](const std::string& target) {
    ASSERT_EQ(RowMathTarget(), target);  // the restriction reaches the dispatch
    ++targets;
    for (int64_t off : {int64_t{0}, int64_t{3}}) {
      SpExpRow(in.data() + off, n - off, got.data());
      for (int64_t i = off; i < n; ++i) {
        ASSERT_EQ(Bits(got[i - off]), Bits(want_exp[i]))
            << "exp x=" << in[i] << " bits " << Bits(in[i]);
      }
      SpLogRow(in.data() + off, n - off, got.data());
      for (int64_t i = off; i < n; ++i) {
        ASSERT_EQ(Bits(got[i - off]), Bits(want_log[i]))
            << "log x=" << in[i] << " bits " << Bits(in[i]);
      }
    }
  });
  std::printf("%lld inputs, %d SIMD targets\n", static_cast<long long>(n), targets);
}

TEST(RowMathTest, ScaledExpMatchesExpAndIgnoresPosition) {
  superpose::testing::ForEachSimdTarget([](const std::string&) {
    std::vector<int32_t> sizes = {100, 1027};
    for (int32_t n = 1; n <= 40; ++n) sizes.push_back(n);  // every tail length
    for (int32_t n : sizes) {
      std::vector<float> x = Row(n, 3 + n), out(n);
      if (n > 2) x[1] = -INFINITY;  // masked tokens weigh 0
      const double sum = ScaledExp(x.data(), n, 0.7f, 1.5f, out.data());
      double ref_sum = 0.0;
      for (int32_t i = 0; i < n; ++i) {
        const double ref = std::exp(static_cast<double>(x[i] * 0.7f - 1.5f));
        EXPECT_NEAR(out[i], ref, 1e-6 * ref) << i;  // Highway's exp: 1 ulp
        ref_sum += ref;
      }
      EXPECT_NEAR(sum, ref_sum, 1e-6 * ref_sum);
      EXPECT_NEAR(ScaledExp(x.data(), n, 0.7f, 1.5f, nullptr), sum, 1e-12 * sum);
      // An element's value is the same over any sub-range, and alone, bitwise.
      for (int32_t off = 1; off < std::min(n, 18); ++off) {
        std::vector<float> part(n - off);
        ScaledExp(x.data() + off, n - off, 0.7f, 1.5f, part.data());
        for (int32_t i = off; i < n; ++i) ASSERT_EQ(part[i - off], out[i]) << n << " " << i;
      }
      for (int32_t i = 0; i < n; ++i) {
        float one = 0.0f;
        ScaledExp(x.data() + i, 1, 0.7f, 1.5f, &one);
        ASSERT_EQ(Bits(one), Bits(out[i])) << n << " " << i;
      }
    }
  });
}

TEST(RowMathTest, MaxOfIsTheMaximum) {
  superpose::testing::ForEachSimdTarget([](const std::string&) {
    for (int32_t n : {1, 2, 15, 16, 17, 63, 64, 65, 1000}) {
      for (uint32_t seed : {1u, 2u}) {
        std::vector<float> x = Row(n, seed * 100 + n);
        for (float& v : x) v -= 50.0f;  // all negative: a zero start would be wrong
        EXPECT_EQ(MaxOf(x.data(), n), *std::max_element(x.begin(), x.end())) << n;
        x[n - 1] = 1.0f;  // the last (tail) element
        EXPECT_EQ(MaxOf(x.data(), n), 1.0f) << n;
      }
    }
  });
}

TEST(RowMathTest, FirstIndexOfFindsTheFirstEqual) {
  superpose::testing::ForEachSimdTarget([](const std::string&) {
    for (int32_t n : {1, 7, 16, 17, 64, 1000}) {
      std::vector<float> x = Row(n, 40 + n);
      EXPECT_EQ(FirstIndexOf(x.data(), n, 1000.0f), n);
      for (int32_t at : {0, n / 2, n - 1}) {
        std::vector<float> y = x;
        y[at] = 1000.0f;
        if (at + 1 < n) y[n - 1] = 1000.0f;  // a later equal one
        EXPECT_EQ(FirstIndexOf(y.data(), n, 1000.0f), at) << n;
      }
    }
  });
}

// WeighRow's kept tokens and masses are the scalar functions' (bitwise z: a product
// fused into the subtraction would move masses by a few units).
TEST(RowMathTest, WeighRowMatchesTheScalarFunctions) {
  superpose::testing::ForEachSimdTarget([](const std::string&) {
    KeptMasses kept;
    for (int32_t V : {1, 5, 16, 17, 31, 40, 1000, 32001}) {
      for (float t : {0.7f, 1.0f, 1.3f}) {
        for (float min_p : {0.0f, 0.01f}) {
          const std::vector<float> x = Row(V, 50 + V, 3.0f);
          const float inv_t = 1.0f / t;
          const float mx = *std::max_element(x.begin(), x.end()) * inv_t;
          WeighRow(x.data(), V, inv_t, mx, min_p, &kept);
          int32_t n = 0;
          uint64_t total = 0;
          for (int32_t i = 0; i < V; ++i) {
            const float w = SpExp(ScaledLogit(x[i], inv_t, mx));
            if (!(w >= min_p) || FixedMass(w) == 0) continue;
            ASSERT_LT(n, kept.count) << V;
            ASSERT_EQ(kept.ids[n], i) << V;
            EXPECT_EQ(kept.keys[n], RankKey(x[i]));
            ASSERT_EQ(static_cast<uint64_t>(kept.mass[n]), FixedMass(w)) << V << " id " << i;
            total += FixedMass(w);
            ++n;
          }
          EXPECT_EQ(kept.count, n);
          EXPECT_EQ(kept.total, total);
        }
      }
    }
  });
}

// RaceRow is the plain race (no skipped tokens) over the tokens its filter keeps.
TEST(RowMathTest, RaceRowMatchesThePlainRace) {
  superpose::testing::ForEachSimdTarget([](const std::string&) {
    std::mt19937 rng(5);
    for (int trial = 0; trial < 300; ++trial) {
      const int32_t V = 1 + static_cast<int32_t>(rng() % 3000);
      std::vector<float> x = Row(V, static_cast<uint32_t>(rng()), 0.5f + (trial % 7));
      if (trial % 4 == 0) {
        for (int32_t i = 0; i < V; i += 2) x[i] = x[0];  // ties
      }
      const float inv_t = 1.0f / (0.3f + 0.1f * (trial % 20));
      const float mx = *std::max_element(x.begin(), x.end()) * inv_t;
      const uint64_t key = RaceKey(trial, trial % 3);
      RaceFilter f;
      if (trial % 3 == 1) f.min_p = 0.02f * (trial % 5);
      if (trial % 5 == 2) {
        f.cut_key = RankKey(x[rng() % V]);
        f.cut_last = static_cast<int32_t>(rng() % V);
      }
      int32_t want = -1;
      float best = -INFINITY;
      for (int32_t i = 0; i < V; ++i) {
        const float z = ScaledLogit(x[i], inv_t, mx);
        const uint32_t k = RankKey(x[i]);
        if (!(k > f.cut_key || (k == f.cut_key && i <= f.cut_last))) continue;
        if (f.min_p > 0.0f && !(SpExp(z) >= f.min_p)) continue;
        const float score = z + RaceNoiseAt(key, i);
        if (score > best) {
          best = score;
          want = i;
        }
      }
      ASSERT_EQ(RaceRow(x.data(), V, inv_t, mx, key, f), want) << "trial " << trial << " V=" << V;
    }
  });
}

TEST(TopLogitsTest, SelectsTheBestLowerIdFirstOnTies) {
  std::vector<float> row = Row(500, 9);
  row[10] = row[20] = row[30] = 100.0f;  // ties at the top
  row[40] = row[41] = -1.0f;
  for (int32_t n : {1, 2, 3, 4, 50, 499, 500}) {
    std::vector<int32_t> idx(row.size());
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) { return row[a] > row[b]; });
    std::vector<TopLogit> top = {{-1, 0.0f}};  // appended after what is there
    SelectTopLogits(row, n, &top);
    ASSERT_EQ(top.size(), static_cast<size_t>(n) + 1);
    for (int32_t i = 0; i < n; ++i) {
      EXPECT_EQ(top[i + 1].id, idx[i]) << n << " " << i;
      EXPECT_EQ(top[i + 1].logit, row[idx[i]]);
    }
  }
}

TEST(TopLogitsTest, LogSumExpMatchesDouble) {
  for (float shift : {0.0f, 80.0f, -80.0f}) {
    std::vector<float> row = Row(32000, 4);
    for (float& x : row) x += shift;
    double mx = *std::max_element(row.begin(), row.end()), sum = 0.0;
    for (float x : row) sum += std::exp(x - mx);
    EXPECT_NEAR(LogSumExp(row), mx + std::log(sum), 1e-5 * std::max(1.0, std::fabs(mx)));
  }
}

TEST(TopLogitsTest, CompactLogitsKeepsWholeRowsInOrder) {
  const int32_t V = 300;
  BatchPlan plan;
  plan.logits_for = {0, 1, 2, 3, 4};
  plan.logits_top = {0, 3, 0, 1, 0};
  std::vector<float> rows;
  for (int r = 0; r < 5; ++r) {
    std::vector<float> row = Row(V, 50 + r);
    rows.insert(rows.end(), row.begin(), row.end());
  }
  ForwardOutput out;
  CompactLogits(plan, V, rows.data(), &out);
  ASSERT_EQ(out.logits.size(), 3u * V);
  for (int w = 0; w < 3; ++w) {
    const int r = 2 * w;  // rows 0, 2, 4 are whole
    EXPECT_TRUE(std::equal(out.logits.begin() + w * V, out.logits.begin() + (w + 1) * V,
                           rows.begin() + r * V));
  }
  std::vector<TopLogit> want;
  SelectTopLogits(absl::MakeConstSpan(rows).subspan(1 * V, V), 3, &want);
  SelectTopLogits(absl::MakeConstSpan(rows).subspan(3 * V, V), 1, &want);
  EXPECT_EQ(out.top, want);
  ASSERT_EQ(out.top_lse.size(), 2u);
  EXPECT_EQ(out.top_lse[0], LogSumExp(absl::MakeConstSpan(rows).subspan(1 * V, V)));
  EXPECT_EQ(out.top_lse[1], LogSumExp(absl::MakeConstSpan(rows).subspan(3 * V, V)));

  plan.logits_top.clear();  // no compact rows: everything whole
  CompactLogits(plan, V, rows.data(), &out);
  EXPECT_EQ(out.logits, rows);
  EXPECT_TRUE(out.top.empty());
}

SamplingOptions Opts(float t, int32_t top_k, float top_p, float min_p, uint64_t seed = 11) {
  SamplingOptions o;
  o.temperature = t;
  o.top_k = top_k;
  o.top_p = top_p;
  o.min_p = min_p;
  o.seed = seed;
  return o;
}

TEST(TopLogitsTest, NeededOnlyWhereACompactRowIsExact) {
  EXPECT_EQ(TopLogitsNeeded(Opts(0, 0, 1, 0), false, 0, 32000), 1);
  EXPECT_EQ(TopLogitsNeeded(Opts(0, 0, 1, 0), true, 0, 32000), 1);
  EXPECT_EQ(TopLogitsNeeded(Opts(0, 0, 1, 0), true, 5, 32000), 5);
  EXPECT_EQ(TopLogitsNeeded(Opts(0, 0, 1, 0), false, 5, 32000), 1);  // no logprobs asked
  EXPECT_EQ(TopLogitsNeeded(Opts(0.8f, 40, 0.9f, 0.05f), true, 5, 32000), 40);
  EXPECT_EQ(TopLogitsNeeded(Opts(0.8f, 10, 1, 0), true, 20, 32000), 20);
  EXPECT_EQ(TopLogitsNeeded(Opts(0.8f, 0, 0.9f, 0), false, 0, 32000), 0);  // no top_k
  EXPECT_EQ(TopLogitsNeeded(Opts(0.8f, 100, 1, 0), false, 0, 32000), 0);   // > kMaxTopLogits
  EXPECT_EQ(TopLogitsNeeded(Opts(0.8f, 40, 1, 0), false, 0, 40), 0);       // whole vocabulary
  SamplingOptions pen = Opts(0, 0, 1, 0);
  pen.repetition_penalty = 1.1f;
  EXPECT_EQ(TopLogitsNeeded(pen, false, 0, 32000), 0);
  pen = Opts(0, 0, 1, 0);
  pen.presence_penalty = 0.5f;
  EXPECT_EQ(TopLogitsNeeded(pen, false, 0, 32000), 0);
  pen = Opts(0, 0, 1, 0);
  pen.frequency_penalty = -0.5f;
  EXPECT_EQ(TopLogitsNeeded(pen, false, 0, 32000), 0);
}

// The compact-row path gives the same tokens and log-probabilities as the whole row,
// bitwise, step after step (the generators stay in step).
TEST(SamplerTest, CompactRowsSampleLikeWholeRows) {
  const struct {
    SamplingOptions o;
    int32_t top_logprobs;
  } cases[] = {
      {Opts(0, 0, 1, 0), 0},          {Opts(0, 0, 1, 0), 7},    {Opts(0.7f, 40, 0.9f, 0), 3},
      {Opts(1.0f, 64, 1, 0.1f), 0},   {Opts(1.3f, 5, 1, 0), 5}, {Opts(0.5f, 20, 0.5f, 0.02f), 0},
      {Opts(2.0f, 64, 0.95f, 0), 64},
  };
  for (int32_t V : {1000, 32000}) {
    for (const auto& c : cases) {
      const int32_t n = TopLogitsNeeded(c.o, true, c.top_logprobs, V);
      ASSERT_GT(n, 0);
      Sampler whole(c.o, {}), compact(c.o, {});
      int distinct = 0, last = -1;
      for (int step = 0; step < 150; ++step) {
        const std::vector<float> row = Row(V, 1000 * V + step, 1.0f + 0.02f * step);
        std::vector<float> scratch = row;
        const int32_t a = whole.Sample(absl::MakeSpan(scratch));
        std::vector<TopLogit> top;
        SelectTopLogits(row, n, &top);
        const int32_t b = compact.SampleTop(top);
        ASSERT_EQ(a, b) << "V=" << V << " step " << step;
        const TokenLogprobs la = ComputeLogprobs(row, a, c.top_logprobs);
        const TokenLogprobs lb = LogprobsFromTop(top, LogSumExp(row), b, c.top_logprobs);
        ASSERT_EQ(la.chosen.logprob, lb.chosen.logprob);
        ASSERT_EQ(la.top.size(), lb.top.size());
        for (size_t i = 0; i < la.top.size(); ++i) {
          ASSERT_EQ(la.top[i].token_id, lb.top[i].token_id);
          ASSERT_EQ(la.top[i].logprob, lb.top[i].logprob);
        }
        whole.Accept(a);
        compact.Accept(b);
        distinct += a != last;
        last = a;
      }
      if (c.o.temperature > 0) {
        EXPECT_GT(distinct, 20);  // it really sampled
      }
    }
  }
}

// The backend's draw (SampleRowReference) for the host sampler's request: penalties
// applied by the caller, every token outside the top_k at -infinity.
int32_t Reference(const SamplingOptions& o, std::vector<float> row, int64_t draw) {
  const int32_t V = static_cast<int32_t>(row.size());
  if (o.temperature <= 0) {
    return static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
  }
  if (o.top_k > 0 && o.top_k < V) {
    std::vector<TopLogit> top;
    SelectTopLogits(row, o.top_k, &top);
    std::vector<float> masked(V, -INFINITY);
    for (const TopLogit& t : top) masked[t.id] = t.logit;
    row = std::move(masked);
  }
  return SampleRowReference(row.data(), V,
                            RowSampling{o.temperature, o.top_p, o.min_p, o.seed, draw});
}

// The host sampler draws the backend's token (bitwise the same race) for every request
// kind, row after row (the draw index is the number of accepted tokens).
TEST(SamplerTest, DrawsTheBackendReferenceToken) {
  superpose::testing::ForEachSimdTarget([](const std::string&) {
    const SamplingOptions cases[] = {
        Opts(1.0f, 0, 1, 0),
        Opts(0.8f, 0, 0.9f, 0),
        Opts(0.8f, 0, 1, 0.05f),
        Opts(1.2f, 0, 0.5f, 0.02f),
        Opts(0.7f, 40, 0.9f, 0),
        Opts(1.0f, 0, 0.999f, 0),
        Opts(3.0f, 0, 0.6f, 0),
        Opts(0, 0, 1, 0),
        Opts(0.6f, 5, 1, 0.1f, 3),
        Opts(1.0f, 0, 1, 0, 12345),
        Opts(0.3f, 0, 0.95f, 0.001f, 99),
    };
    int checked = 0;
    for (int32_t V : {500, 32001}) {
      for (const SamplingOptions& o : cases) {
        Sampler s(o, {});
        for (int step = 0; step < 60; ++step) {
          const std::vector<float> row = Row(V, 77 * V + step, 0.5f + 0.05f * step);
          std::vector<float> scratch = row;
          const int32_t got = s.Sample(absl::MakeSpan(scratch));
          ASSERT_EQ(got, Reference(o, row, step))
              << "V=" << V << " T=" << o.temperature << " top_k=" << o.top_k << " top_p=" << o.top_p
              << " min_p=" << o.min_p << " step " << step;
          s.Accept(got);
          ++checked;
        }
      }
    }
    EXPECT_EQ(checked, 2 * 11 * 60);
  });
}

// Many random rows and seeds, one draw each, including rows with ties and with huge
// logits (the approximate pass must never hide the winner).
TEST(SamplerTest, ManyRowsAndSeedsMatchTheReference) {
  superpose::testing::ForEachSimdTarget([](const std::string&) {
    std::mt19937_64 rng(3);
    for (int trial = 0; trial < 400; ++trial) {
      const int32_t V = 2 + static_cast<int32_t>(rng() % 5000);
      const float spread = std::ldexp(1.0f, static_cast<int>(rng() % 12) - 4);
      std::vector<float> row = Row(V, static_cast<uint32_t>(rng()), spread);
      if (trial % 5 == 0) {
        for (int32_t i = 0; i < V; i += 3) row[i] = row[0];  // ties
      }
      if (trial % 7 == 0) {
        for (float& x : row) x = x * 1000.0f + 20000.0f;  // large magnitudes
      }
      SamplingOptions o = Opts(0.2f + static_cast<float>(rng() % 30) / 10.0f, 0, 1, 0, rng());
      if (trial % 2 == 1) o.top_p = static_cast<float>(rng() % 100 + 1) / 100.0f;
      if (trial % 3 == 1) o.min_p = static_cast<float>(rng() % 50) / 200.0f;
      if (trial % 4 == 3) o.top_k = 1 + static_cast<int32_t>(rng() % 64);
      Sampler s(o, {});
      const int64_t draws = static_cast<int64_t>(rng() % 4);
      for (int64_t d = 0; d < draws; ++d) s.Accept(0);
      std::vector<float> scratch = row;
      ASSERT_EQ(s.Sample(absl::MakeSpan(scratch)), Reference(o, row, draws))
          << "trial " << trial << " V=" << V << " T=" << o.temperature << " top_k=" << o.top_k
          << " top_p=" << o.top_p << " min_p=" << o.min_p;
    }
  });
}

// Penalties change the row; the draw is then the reference's over the penalised row.
TEST(SamplerTest, PenalisedRowsDrawTheReferenceToken) {
  SamplingOptions o = Opts(0.9f, 0, 0.95f, 0);
  o.repetition_penalty = 1.3f;
  o.frequency_penalty = 0.4f;
  const std::vector<int32_t> prompt = {3, 5, 7, 100, 101};
  Sampler s(o, prompt);
  std::map<int32_t, int32_t> counts;
  std::vector<int32_t> seen = prompt;
  for (int step = 0; step < 40; ++step) {
    const std::vector<float> row = Row(1000, 5000 + step, 1.5f);
    std::vector<float> pen = row;
    std::sort(seen.begin(), seen.end());
    seen.erase(std::unique(seen.begin(), seen.end()), seen.end());
    for (int32_t id : seen) pen[id] = pen[id] > 0 ? pen[id] / 1.3f : pen[id] * 1.3f;
    for (const auto& [id, c] : counts) pen[id] -= 0.4f * c;
    std::vector<float> scratch = row;
    const int32_t got = s.Sample(absl::MakeSpan(scratch));
    ASSERT_EQ(got, Reference(o, pen, step)) << "step " << step;
    s.Accept(got);
    ++counts[got];
    seen.push_back(got);
  }
}

// The sampler is exact: frequencies over 20000 draws (successive draw indices) within 5
// standard deviations of softmax(x / T) over the kept tokens (top-k, min-p, top-p in
// rank order).
TEST(SamplerTest, SamplesTheTruncatedSoftmax) {
  const std::vector<float> row = {2.0f, 1.5f, 1.0f, 0.2f, -1.0f, -3.0f, 0.0f, 1.2f};
  const int32_t V = static_cast<int32_t>(row.size());
  for (const SamplingOptions& o :
       {Opts(1.0f, 0, 1, 0), Opts(0.7f, 0, 0.8f, 0), Opts(1.5f, 0, 1, 0.2f), Opts(1.0f, 4, 1, 0),
        Opts(1.2f, 5, 0.9f, 0.1f)}) {
    const std::vector<double> p =
        testing::TruncatedSoftmax(row, o.temperature, o.top_k, o.top_p, o.min_p);
    const int draws = 20000;
    std::vector<int> count(V, 0);
    Sampler s(o, {});
    for (int d = 0; d < draws; ++d) {
      std::vector<float> scratch = row;
      const int32_t t = s.Sample(absl::MakeSpan(scratch));
      ++count[t];
      s.Accept(t);
    }
    testing::ExpectFrequencies(count, p, draws,
                               absl::StrCat("T=", o.temperature, " top_k=", o.top_k,
                                            " top_p=", o.top_p, " min_p=", o.min_p));
  }
}

// A flat row: top-p must rank thousands of tied tokens (lower ids first).
TEST(SamplerTest, TopPOverAFlatRowKeepsTheLowestIds) {
  std::vector<float> row(4096, 0.25f);
  SamplingOptions o = Opts(1.0f, 0, 0.25f, 0, 5);
  Sampler s(o, {});
  int32_t hi = 0;
  for (int i = 0; i < 2000; ++i) {
    std::vector<float> scratch = row;
    const int32_t t = s.Sample(absl::MakeSpan(scratch));
    hi = std::max(hi, t);
    s.Accept(t);  // the next draw index (without it the same draw repeats)
  }
  EXPECT_LT(hi, 1024);
  EXPECT_GT(hi, 900);
}

}  // namespace
}  // namespace superpose::engine
