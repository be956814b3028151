// Host-side cost of turning one logits row into a token (engine/runtime/sampler.h), per
// row, for the sampling settings clients send most: greedy, temperature with top-k,
// top-p, min-p and plain temperature, with and without top log-probabilities. The
// engine samples its rows one after the other on its scheduler thread, so at batch B a
// decode step pays B times the time per row printed here on top of the forward pass.
//
// Two kinds of rows, drawn once: peaked (a few large values over a Gaussian body, like
// a trained model's) and flat (a narrow Gaussian, like a random-weight model's, where
// top-p keeps most of the vocabulary); each setting runs `--reps` rows, timed one by one:
// the median is robust to other load on the machine. `--simd` caps the SIMD target
// (engine/simd.h) to compare targets on one machine.
//
//   build/bench/sampler_bench --vocab=32000,128256 [--simd=avx2]
#include <cmath>
#include <cstdio>
#include <fstream>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench/bench_util.h"
#include "engine/row_math.h"
#include "engine/runtime/sampler.h"
#include "engine/simd.h"

ABSL_FLAG(std::string, vocab, "32000,128256", "vocabulary sizes, comma-separated");
ABSL_FLAG(int, reps, 200, "rows sampled per setting");
ABSL_FLAG(std::string, simd, "auto", "SIMD target cap: auto, or one this CPU has (avx2, ...)");

namespace superpose::bench {
namespace {

struct Setting {
  const char* name;
  engine::SamplingOptions options;
  int top_logprobs = 0;
};

std::vector<Setting> Settings() {
  std::vector<Setting> s;
  auto add = [&](const char* name, float temperature, int top_k, float top_p, float min_p,
                 int top_logprobs = 0, float rep = 1.0f) {
    Setting x{name, {}, top_logprobs};
    x.options.temperature = temperature;
    x.options.top_k = top_k;
    x.options.top_p = top_p;
    x.options.min_p = min_p;
    x.options.repetition_penalty = rep;
    x.options.seed = 7;
    s.push_back(x);
  };
  add("greedy", 0.0f, 0, 1.0f, 0.0f);
  add("greedy + 5 logprobs", 0.0f, 0, 1.0f, 0.0f, 5);
  add("T=0.8 top_k=40", 0.8f, 40, 1.0f, 0.0f);
  add("T=0.8 top_p=0.9", 0.8f, 0, 0.9f, 0.0f);
  add("T=0.8 min_p=0.05", 0.8f, 0, 1.0f, 0.05f);
  add("T=1 (no truncation)", 1.0f, 0, 1.0f, 0.0f);
  add("T=1 top_p=0.95 rep=1.1", 1.0f, 0, 0.95f, 0.0f, 0, 1.1f);
  return s;
}

void Run(int vocab, int reps, bool flat) {
  std::mt19937 rng(1);
  std::normal_distribution<float> body(0.0f, flat ? 0.3f : 2.0f);
  std::vector<std::vector<float>> rows(16, std::vector<float>(vocab));
  for (auto& r : rows) {
    for (float& x : r) x = body(rng);
    if (flat) continue;
    for (int i = 0; i < 8; ++i) r[rng() % vocab] = 12.0f + i;  // a few likely tokens
  }
  std::vector<int32_t> prompt;
  for (int i = 0; i < 200; ++i) prompt.push_back(static_cast<int32_t>(rng() % vocab));
  std::printf("\nvocab %d, %s rows, %d rows per setting\n", vocab, flat ? "flat" : "peaked", reps);
  std::printf("| setting | us per row (median) | mean | rows/s |\n|---|---:|---:|---:|\n");
  for (const Setting& s : Settings()) {
    engine::Sampler sampler(s.options, prompt);
    std::vector<float> scratch(vocab);
    long checksum = 0;
    std::vector<double> us(reps);
    for (int i = 0; i < reps; ++i) {
      const double t0 = NowS();
      const std::vector<float>& row = rows[i % rows.size()];
      scratch.assign(row.begin(), row.end());
      const int32_t t = sampler.Sample(absl::MakeSpan(scratch));
      if (s.top_logprobs > 0) {
        checksum += engine::ComputeLogprobs(row, t, s.top_logprobs).top.size();
      }
      sampler.Accept(t);
      checksum += t;
      us[i] = (NowS() - t0) * 1e6;
    }
    const double median = Percentile(us, 50);
    const double mean = std::accumulate(us.begin(), us.end(), 0.0) / reps;
    std::printf("| %s | %.1f | %.1f | %.0f |\n", s.name, median, mean, 1e6 / median);
    if (checksum == -1) std::printf("!");
  }
}

}  // namespace
}  // namespace superpose::bench

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  namespace simd = superpose::engine::simd;
  const absl::Status capped = simd::LimitTargets(absl::GetFlag(FLAGS_simd));
  if (!capped.ok()) {
    std::fprintf(stderr, "--simd: %s\n", capped.ToString().c_str());
    return 2;
  }
  // libhwy 1.0.3 forgets DisableTargets (LimitTargets) for dispatch at the next
  // hwy::SupportedTargets() call; the test restriction holds.
  std::optional<simd::ScopedTarget> pinned;
  if (absl::GetFlag(FLAGS_simd) != "auto") pinned.emplace(simd::AvailableTargets().front());
  std::printf("CPU %s, SIMD target %s (row passes: %s)\n", superpose::bench::CpuModel().c_str(),
              simd::ActiveTargetName().c_str(), superpose::engine::RowMathTarget());
  for (absl::string_view v : absl::StrSplit(absl::GetFlag(FLAGS_vocab), ',')) {
    int vocab = 0;
    if (!absl::SimpleAtoi(v, &vocab) || vocab < 2) {
      std::fprintf(stderr, "bad --vocab entry\n");
      return 2;
    }
    for (bool flat : {false, true}) superpose::bench::Run(vocab, absl::GetFlag(FLAGS_reps), flat);
  }
  return 0;
}
