#include "engine/rag/rag.h"

#include <algorithm>
#include <numeric>

namespace superpose::engine::rag {

Layout ComputeLayout(const Spec& spec) {
  Layout l;
  const int32_t n = static_cast<int32_t>(spec.documents.size());
  const float p = static_cast<float>(spec.preamble.size());
  l.doc_start.assign(n, p);
  l.doc_step.assign(n, 1.0f);
  if (spec.options.positions == PositionMode::kLeftAligned) {
    size_t longest = 0;
    for (const auto& d : spec.documents) longest = std::max(longest, d.size());
    l.span = static_cast<float>(longest);
  } else {
    if (spec.options.canonical_span > 0.0f) {
      l.span = spec.options.canonical_span;
    } else {
      double inv = 0.0;  // S = n / sum(1 / |d_i|): the harmonic mean
      for (const auto& d : spec.documents) inv += 1.0 / static_cast<double>(d.size());
      l.span = n > 0 ? static_cast<float>(n / inv) : 0.0f;
    }
    for (int32_t i = 0; i < n; ++i) {
      l.doc_step[i] = l.span / static_cast<float>(spec.documents[i].size());
    }
  }
  l.query_start = p + l.span;
  l.postamble_start = l.query_start + static_cast<float>(spec.query.size());
  l.answer_start = l.postamble_start + static_cast<float>(spec.postamble.size());
  return l;
}

double Saliency(const PathLikelihood& ll, float doc_weight) {
  return ll.QueryMean() + static_cast<double>(doc_weight) * ll.DocMean();
}

std::vector<int32_t> TopK(const std::vector<double>& scores, int32_t k) {
  std::vector<int32_t> idx(scores.size());
  std::iota(idx.begin(), idx.end(), 0);
  k = std::clamp<int32_t>(k, 0, static_cast<int32_t>(idx.size()));
  std::stable_sort(idx.begin(), idx.end(),
                   [&](int32_t a, int32_t b) { return scores[a] > scores[b]; });
  idx.resize(k);
  std::sort(idx.begin(), idx.end());
  return idx;
}

std::vector<int32_t> Flatten(const Spec& spec) {
  std::vector<int32_t> out = spec.preamble;
  for (const auto& d : spec.documents) out.insert(out.end(), d.begin(), d.end());
  out.insert(out.end(), spec.query.begin(), spec.query.end());
  out.insert(out.end(), spec.postamble.begin(), spec.postamble.end());
  return out;
}

int64_t FlatSize(const Spec& spec) {
  int64_t n = spec.preamble.size() + spec.query.size() + spec.postamble.size();
  for (const auto& d : spec.documents) n += d.size();
  return n;
}

Flops NaiveFlops(const FlopModel& m, int64_t prompt, int64_t cached, int64_t generated) {
  double f = m.Segment(cached, prompt - cached, 1);
  // Generated token k (k < generated - 1) is fed back and attends prompt + k keys.
  for (int64_t k = 0; k + 1 < generated; ++k) f += m.Segment(prompt + k, 1, 1);
  return {f, f};
}

}  // namespace superpose::engine::rag
