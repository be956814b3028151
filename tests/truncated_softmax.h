// The distribution a sampler must draw from: softmax(x / T) over the kept tokens (the
// top_k best in rank order, then min-p, then the shortest rank-order prefix reaching
// top_p), renormalised; and the check that draw counts follow it. Shared by the host
// sampler's test and the backend reference's.
#pragma once

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace superpose::testing {

inline std::vector<double> TruncatedSoftmax(const std::vector<float>& row, float temperature,
                                            int32_t top_k, float top_p, float min_p) {
  const int32_t V = static_cast<int32_t>(row.size());
  std::vector<int32_t> rank(V);
  std::iota(rank.begin(), rank.end(), 0);
  std::stable_sort(rank.begin(), rank.end(), [&](int32_t a, int32_t b) { return row[a] > row[b]; });
  const int32_t n = top_k > 0 ? top_k : V;
  std::vector<double> w(V, 0.0);
  double z = 0;
  for (int32_t j = 0; j < n; ++j) {
    const int32_t i = rank[j];
    w[i] = std::exp((row[i] - row[rank[0]]) / temperature);
    if (w[i] < min_p) w[i] = 0;
    z += w[i];
  }
  std::vector<double> p(V, 0.0);
  double cum = 0, kept = 0;
  for (int32_t i : rank) {
    if (w[i] == 0 || cum >= top_p) continue;
    p[i] = w[i] / z;
    cum += p[i];
    kept += p[i];
  }
  for (double& v : p) v /= kept;
  return p;
}

// Each token's count within 5 standard deviations of draws * p.
inline void ExpectFrequencies(const std::vector<int>& count, const std::vector<double>& p,
                              int draws, const std::string& label) {
  for (size_t i = 0; i < p.size(); ++i) {
    const double sd = std::sqrt(draws * p[i] * (1 - p[i])) + 1;
    EXPECT_NEAR(count[i], draws * p[i], 5 * sd) << label << " token " << i;
  }
}

}  // namespace superpose::testing
