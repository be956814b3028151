// The sampler against a plain reference (double precision, whole-vocabulary sort), its
// compact-row path (SampleTop, LogprobsFromTop) against its whole-row path, and the
// vectorised row passes it is built on.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "engine/backend.h"
#include "engine/runtime/row_math.h"
#include "engine/runtime/sampler.h"

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

TEST(RowMathTest, ScaledExpMatchesExpAndIgnoresPosition) {
  for (int32_t n : {1, 7, 15, 16, 17, 100, 1027}) {
    std::vector<float> x = Row(n, 3 + n), out(n);
    const double sum = ScaledExp(x.data(), n, 0.7f, 1.5f, out.data());
    double ref_sum = 0.0;
    for (int32_t i = 0; i < n; ++i) {
      const double ref = std::exp(static_cast<double>(x[i] * 0.7f - 1.5f));
      EXPECT_NEAR(out[i], ref, 1e-6 * ref) << i;  // libmvec: 4 ulp
      ref_sum += ref;
    }
    EXPECT_NEAR(sum, ref_sum, 1e-6 * ref_sum);
    EXPECT_NEAR(ScaledExp(x.data(), n, 0.7f, 1.5f, nullptr), sum, 1e-12 * sum);
    // Any sub-range gives the same element values, bitwise.
    for (int32_t off : {1, 5}) {
      if (off >= n) continue;
      std::vector<float> part(n - off);
      ScaledExp(x.data() + off, n - off, 0.7f, 1.5f, part.data());
      for (int32_t i = off; i < n; ++i) ASSERT_EQ(part[i - off], out[i]) << n << " " << i;
    }
  }
}

TEST(RowMathTest, MaxOfIsTheMaximum) {
  for (int32_t n : {1, 2, 15, 16, 63, 64, 65, 1000}) {
    for (uint32_t seed : {1u, 2u}) {
      std::vector<float> x = Row(n, seed * 100 + n);
      for (float& v : x) v -= 50.0f;  // all negative: a zero start would be wrong
      EXPECT_EQ(MaxOf(x.data(), n), *std::max_element(x.begin(), x.end())) << n;
      x[n - 1] = 1.0f;  // the last (tail) element
      EXPECT_EQ(MaxOf(x.data(), n), 1.0f) << n;
    }
  }
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

// The documented semantics, spelled out in double precision over a fully sorted row:
// tokens ranked by logit (lower id first on ties); top_k keeps the first top_k; min-p
// and top-p cut in rank order; the draw walks the kept tokens in rank order with top_k,
// else in id order.
int32_t Reference(const SamplingOptions& o, const std::vector<float>& row, std::mt19937_64* rng) {
  const int32_t V = static_cast<int32_t>(row.size());
  std::vector<int32_t> rank(V);
  std::iota(rank.begin(), rank.end(), 0);
  std::stable_sort(rank.begin(), rank.end(), [&](int32_t a, int32_t b) { return row[a] > row[b]; });
  if (o.temperature <= 0) return rank[0];
  const bool top_k = o.top_k > 0 && o.top_k < V;
  const int32_t n = top_k ? o.top_k : V;
  const float inv_t = 1.0f / o.temperature;
  const float mx = row[rank[0]] * inv_t;
  std::vector<double> w(V);
  double sum = 0;
  for (int32_t j = 0; j < n; ++j) {
    w[rank[j]] = std::exp(static_cast<double>(row[rank[j]] * inv_t - mx));
    sum += w[rank[j]];
  }
  std::vector<int32_t> kept;
  for (int32_t j = 0; j < n; ++j) {
    if (w[rank[j]] / sum >= o.min_p * (1.0 / sum)) kept.push_back(rank[j]);
  }
  if (o.top_p < 1.0f) {
    double cum = 0;
    size_t k = 0;
    while (k < kept.size()) {
      cum += w[kept[k]] / sum;
      ++k;
      if (cum >= o.top_p) break;
    }
    kept.resize(k);
  }
  if (!top_k) std::sort(kept.begin(), kept.end());  // the draw walks them in id order
  double total = 0;
  for (int32_t id : kept) total += w[id] / sum;
  std::uniform_real_distribution<double> uni(0.0, total);
  const double r = uni(*rng);
  double cum = 0;
  for (int32_t id : kept) {
    cum += w[id] / sum;
    if (r < cum) return id;
  }
  return kept.back();
}

TEST(SamplerTest, MatchesTheReference) {
  const SamplingOptions cases[] = {
      Opts(1.0f, 0, 1, 0),        Opts(0.8f, 0, 0.9f, 0),  Opts(0.8f, 0, 1, 0.05f),
      Opts(1.2f, 0, 0.5f, 0.02f), Opts(0.7f, 40, 0.9f, 0), Opts(1.0f, 0, 0.999f, 0),
      Opts(3.0f, 0, 0.6f, 0),     Opts(0, 0, 1, 0),
  };
  int checked = 0;
  for (int32_t V : {500, 32000}) {
    for (const SamplingOptions& o : cases) {
      Sampler s(o, {});
      std::mt19937_64 ref_rng(o.seed);
      for (int step = 0; step < 100; ++step) {
        const std::vector<float> row = Row(V, 77 * V + step, 0.5f + 0.05f * step);
        std::vector<float> scratch = row;
        ASSERT_EQ(s.Sample(absl::MakeSpan(scratch)), Reference(o, row, &ref_rng))
            << "V=" << V << " T=" << o.temperature << " top_k=" << o.top_k << " top_p=" << o.top_p
            << " min_p=" << o.min_p << " step " << step;
        ++checked;
      }
    }
  }
  EXPECT_EQ(checked, 1600);
}

// A flat row: top-p must rank thousands of tied tokens (lower ids first).
TEST(SamplerTest, TopPOverAFlatRowKeepsTheLowestIds) {
  std::vector<float> row(4096, 0.25f);
  SamplingOptions o = Opts(1.0f, 0, 0.25f, 0, 5);
  Sampler s(o, {});
  int32_t hi = 0;
  for (int i = 0; i < 2000; ++i) {
    std::vector<float> scratch = row;
    hi = std::max(hi, s.Sample(absl::MakeSpan(scratch)));
  }
  EXPECT_LT(hi, 1024);
  EXPECT_GT(hi, 900);
}

}  // namespace
}  // namespace superpose::engine
