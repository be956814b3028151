// Superposition prompting (papers.md section 1; docs/rag.md): the request shape, the
// equilibrium / left-aligned position assignment, Bayesian path saliency, top-k
// selection and FLOP accounting. Pure functions; planner.h runs the sequences.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/model/config.h"
#include "engine/model/flop_model.h"

namespace superpose::engine::rag {

enum class Mode { kSuperposition, kNaive };
enum class PositionMode { kEquilibrium, kLeftAligned };

struct Options {
  Mode mode = Mode::kSuperposition;
  int32_t top_k = 1;  // paths kept, in [1, number of documents]
  PositionMode positions = PositionMode::kEquilibrium;
  float doc_weight = 1.0f;  // w in score = LLq + w * LLd
  bool path_cache = true;   // reuse document KV (and LLd) across requests
  // > 0: the equilibrium span S is this fixed number (papers.md 1.5, canonical S), so
  // a document's positions depend only on its own length and its KV is reusable
  // across retrieved sets. 0: S = harmonic mean of this request's document lengths.
  float canonical_span = 0.0f;
};

// A tokenized RAG request: every segment tokenized on its own (BOS only on the
// preamble, if the tokenizer adds one).
struct Spec {
  std::vector<int32_t> preamble;
  std::vector<std::vector<int32_t>> documents;
  std::vector<int32_t> query;
  std::vector<int32_t> postamble;  // may be empty
  Options options;
};

// Positions of every segment (papers.md 1.2).
struct Layout {
  float span = 0.0f;             // S: every document path spans [|p|, |p| + S)
  std::vector<float> doc_start;  // |p| for every document
  std::vector<float> doc_step;   // delta_i
  float query_start = 0.0f;      // |p| + S (left-aligned: |p| + max |d_i|)
  float postamble_start = 0.0f;  // query_start + |q|
  float answer_start = 0.0f;     // postamble_start + |t|

  float DocPosition(int32_t doc, int32_t j) const { return doc_start[doc] + j * doc_step[doc]; }
};
Layout ComputeLayout(const Spec& spec);

// Per-token-density log-likelihoods of one path (sums over within-segment next-token
// predictions; a segment's first token is not scored).
struct PathLikelihood {
  double doc_sum = 0.0;
  int32_t doc_count = 0;
  double query_sum = 0.0;
  int32_t query_count = 0;
  double DocMean() const { return doc_count > 0 ? doc_sum / doc_count : 0.0; }
  double QueryMean() const { return query_count > 0 ? query_sum / query_count : 0.0; }
};
// score_i = LLq_i + w * LLd_i
double Saliency(const PathLikelihood& ll, float doc_weight);
// Indices of the k highest scores (ties: lower index first), in ascending index order.
std::vector<int32_t> TopK(const std::vector<double>& scores, int32_t k);

struct Flops {
  double total = 0;          // every FLOP the request cost
  double critical_path = 0;  // with parallel paths counted once (the longest)
};

struct DocResult {
  double score = 0;     // saliency (superposition mode)
  double doc_ll = 0;    // LLd: mean log-probability of the document tokens
  double query_ll = 0;  // LLq: mean log-probability of the query given the document
  bool kept = true;
  bool cached = false;  // document KV came from the path cache
};

// What a RAG request reports with its final event.
struct Result {
  Mode mode = Mode::kSuperposition;
  float span = 0.0f;  // superposition: the layout's span S
  std::vector<DocResult> docs;
  int64_t computed_tokens = 0;    // prompt tokens run through the model
  int64_t path_cache_tokens = 0;  // document tokens taken from the path cache
  int64_t prefix_cache_tokens = 0;
  int64_t pruned_tokens = 0;  // document + query tokens of pruned paths
  Flops flops;                // what this request cost
  Flops naive_flops;          // what the same request costs as one flat prompt
};

// The naive (flattened) prompt: p, d_1 .. d_n, q, t; and its length.
std::vector<int32_t> Flatten(const Spec& spec);
int64_t FlatSize(const Spec& spec);
// FLOPs of a flat prompt of `prompt` tokens, `cached` of them from the prefix cache,
// followed by `generated` decode steps (a step per generated token but the last).
Flops NaiveFlops(const FlopModel& m, int64_t prompt, int64_t cached, int64_t generated);

}  // namespace superpose::engine::rag
