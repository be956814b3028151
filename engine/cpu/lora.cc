#include "engine/cpu/lora.h"

#include <algorithm>

namespace superpose::engine::cpu {
namespace {

// Sum of a[i] * x[i] over 16 lane-wise partial sums and a fixed reduction tree: the
// same arithmetic for a row whatever else the step holds.
float Dot16(const float* a, const float* x, int32_t n) {
  float acc[16] = {};
  int32_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int32_t l = 0; l < 16; ++l) acc[l] += a[i + l] * x[i + l];
  }
  for (int32_t l = 0; i < n; ++i, ++l) acc[l] += a[i] * x[i];
  for (int32_t w = 8; w >= 1; w /= 2) {
    for (int32_t l = 0; l < w; ++l) acc[l] += acc[l + w];
  }
  return acc[0];
}

}  // namespace

void LoraStep::SetRows(const std::vector<int32_t>& begin, const std::vector<int32_t>& count) {
  rows_.clear();
  for (size_t s = 0; s < per_seq_.size() && s < begin.size(); ++s) {
    if (per_seq_[s] == nullptr) continue;
    for (int32_t r = begin[s]; r < begin[s] + count[s]; ++r)
      rows_.push_back({r, per_seq_[s].get()});
  }
}

void LoraStep::Apply(LoraSite site, int32_t layer, const float* x, float* y,
                     int32_t y_width) const {
  if (rows_.empty()) return;
  const int32_t n = static_cast<int32_t>(rows_.size());
#pragma omp parallel if (n > 1)
  {
    std::vector<float> t, u;
#pragma omp for schedule(static)
    for (int32_t i = 0; i < n; ++i) {
      const auto [row, lora] = rows_[i];
      for (const LoraProj& p : lora->layers[layer][static_cast<int32_t>(site)]) {
        const float* xr = x + static_cast<size_t>(row) * p.in;
        t.resize(p.rank);
        for (int32_t k = 0; k < p.rank; ++k) {
          t[k] = Dot16(&p.a[static_cast<size_t>(k) * p.in], xr, p.in);
        }
        u.assign(p.out, 0.0f);
        for (int32_t k = 0; k < p.rank; ++k) {
          const float tk = t[k];
          const float* bk = &p.bt[static_cast<size_t>(k) * p.out];
          for (int32_t j = 0; j < p.out; ++j) u[j] += tk * bk[j];
        }
        float* yr = y + static_cast<size_t>(row) * y_width + p.offset;
        for (int32_t j = 0; j < p.out; ++j) yr[j] += p.scale * u[j];
      }
    }
  }
}

}  // namespace superpose::engine::cpu
