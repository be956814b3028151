#include "engine/row_sampling.h"

#include <algorithm>
#include <vector>

namespace superpose::engine {

int32_t SampleRowReference(const float* x, int32_t V, const RowSampling& s) {
  const float inv_t = 1.0f / s.temperature;
  float mx_raw = x[0];
  for (int32_t i = 1; i < V; ++i) mx_raw = x[i] > mx_raw ? x[i] : mx_raw;
  const float mx = mx_raw * inv_t;
  std::vector<int32_t> kept;
  for (int32_t i = 0; i < V; ++i) {
    if (SpExp(ScaledLogit(x[i], inv_t, mx)) >= s.min_p) kept.push_back(i);
  }
  if (s.top_p < 1.0f) {
    uint64_t total = 0;
    for (int32_t i : kept) total += FixedMass(SpExp(ScaledLogit(x[i], inv_t, mx)));
    const uint64_t target = TopPTarget(s.top_p, total);
    std::stable_sort(kept.begin(), kept.end(),
                     [&](int32_t a, int32_t b) { return RankKey(x[a]) > RankKey(x[b]); });
    uint64_t cum = 0;
    size_t n = 0;
    while (n < kept.size()) {
      cum += FixedMass(SpExp(ScaledLogit(x[kept[n]], inv_t, mx)));
      ++n;
      if (cum >= target) break;
    }
    kept.resize(n);
  }
  const uint64_t key = RaceKey(s.seed, s.draw);
  int32_t best = -1;
  float best_score = 0.0f;
  for (int32_t i : kept) {
    const float score = ScaledLogit(x[i], inv_t, mx) + RaceNoiseAt(key, i);
    if (best < 0 || score > best_score || (score == best_score && i < best)) {
      best = i;
      best_score = score;
    }
  }
  return best;
}

}  // namespace superpose::engine
