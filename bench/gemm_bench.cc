// The CPU backend's float32 GEMM (SmallBatchGemm, the weight-streaming kernel) on the
// linear layers of a 125M Llama (hidden 768, MLP 2048, vocab 32000), next to OpenBLAS
// sgemm, at decode-sized (1..64) and prefill-sized row counts. Each layer shape is timed
// over 12 copies of its weights (the lm head over one), the caches flushed before each
// pass over all shapes, so the weights come from memory as in a decode step. `--simd`
// caps the Highway target, to time every target this CPU has (sgemm ignores it).
//
//   build/bench/gemm_bench [--simd=auto|avx3|avx2|sse4|neon|emu128|scalar]
//                          [--rows=1,2,4,...] [--reps=3]
#include <cblas.h>
#include <omp.h>

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "bench/bench_util.h"
#include "engine/cpu/blas_setup.h"
#include "engine/cpu/small_gemm.h"
#include "engine/simd.h"

ABSL_FLAG(std::string, rows, "1,2,4,8,16,32,64,128,512", "Row counts to time");
ABSL_FLAG(int32_t, reps, 3, "Timed passes per row count (the best is reported)");
ABSL_FLAG(std::string, simd, "auto", "Highway target cap: auto or one this CPU supports");

namespace {

using namespace superpose;  // NOLINT

struct Shape {
  int32_t in, out, copies;
};

// q/o projection, gate/up, down (12 layers each) and the lm head.
const Shape kShapes[] = {{768, 768, 12}, {768, 2048, 12}, {2048, 768, 12}, {768, 32000, 1}};
constexpr int kNumShapes = sizeof(kShapes) / sizeof(kShapes[0]);

std::string CpuModel() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    absl::string_view rest = line;
    const size_t colon = rest.find(':');
    if (absl::ConsumePrefix(&rest, "model name") && colon != absl::string_view::npos) {
      return std::string(absl::StripAsciiWhitespace(line.substr(colon + 1)));
    }
  }
  return "unknown CPU";
}

std::vector<int32_t> RowCounts() {
  std::vector<int32_t> out;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_rows), ',')) {
    int32_t r;
    if (absl::SimpleAtoi(s, &r) && r > 0) out.push_back(r);
  }
  return out;
}

// Seconds for one call per weight copy of shape s, our kernel or sgemm.
double TimeShape(const Shape& s, const std::vector<std::vector<float>>& ws, int32_t rows,
                 const float* x, float* y, bool blas) {
  const double t0 = bench::NowS();
  for (const std::vector<float>& w : ws) {
    if (blas) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, s.out, s.in, 1.0f, x, s.in,
                  w.data(), s.in, 0.0f, y, s.out);
    } else {
      engine::cpu::SmallBatchGemm(x, rows, s.in, w.data(), s.out, y);
    }
  }
  return bench::NowS() - t0;
}

volatile char g_flush_sink;  // keeps FlushCaches' reads

// Reads a buffer twice the size of the last-level cache, so that no weights stay cached.
void FlushCaches() {
  const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
  static std::vector<char> buf(static_cast<size_t>(std::clamp(2 * l3, 64L << 20, 1L << 30)), 1);
  char acc = 0;
  for (size_t i = 0; i < buf.size(); i += 64) acc = static_cast<char>(acc ^ buf[i]);
  g_flush_sink = acc;
}

struct Bench {
  std::vector<std::vector<float>> ws[kNumShapes];
  std::vector<float> x, y;

  explicit Bench(int32_t max_rows) {
    std::mt19937 rng(1);
    std::uniform_real_distribution<float> ud(-1.0f, 1.0f);
    int32_t max_in = 1, max_out = 1;
    for (int i = 0; i < kNumShapes; ++i) {
      const Shape& s = kShapes[i];
      max_in = std::max(max_in, s.in);
      max_out = std::max(max_out, s.out);
      for (int c = 0; c < s.copies; ++c) {
        ws[i].emplace_back(static_cast<size_t>(s.out) * s.in);
        for (float& v : ws[i].back()) v = ud(rng);
      }
    }
    x.resize(static_cast<size_t>(max_rows) * max_in);
    y.resize(static_cast<size_t>(max_rows) * max_out);
    for (float& v : x) v = ud(rng);
  }

  // One table row: best of `reps` passes per shape, ours and sgemm in turn (so both see
  // the same machine load).
  void Row(int32_t rows, int reps) {
    double best[2][kNumShapes];
    for (auto& b : best) std::fill(b, b + kNumShapes, 1e30);
    for (int rep = 0; rep < reps; ++rep) {
      for (int b = 0; b < 2; ++b) {
        FlushCaches();
        for (int i = 0; i < kNumShapes; ++i) {
          const double t = TimeShape(kShapes[i], ws[i], rows, x.data(), y.data(), b == 1);
          best[b][i] = std::min(best[b][i], t);
        }
      }
    }
    double flops_all = 0, t_all[2] = {0, 0};
    std::printf("| %d |", rows);
    for (int i = 0; i < kNumShapes; ++i) {
      const Shape& s = kShapes[i];
      const double flops = 2.0 * rows * s.in * s.out * s.copies;
      flops_all += flops;
      for (int b = 0; b < 2; ++b) t_all[b] += best[b][i];
      std::printf(" %.1f |", flops / best[0][i] / 1e9);
    }
    std::printf(" %.1f | %.1f |\n", flops_all / t_all[0] / 1e9, flops_all / t_all[1] / 1e9);
    std::fflush(stdout);
  }
};

}  // namespace

int main(int argc, char** argv) {
  engine::cpu::EnsureBlasCoreType(argv);
  absl::ParseCommandLine(argc, argv);
  if (absl::Status st = engine::simd::LimitTargets(absl::GetFlag(FLAGS_simd)); !st.ok()) {
    std::fprintf(stderr, "%s\n", std::string(st.message()).c_str());
    return 2;
  }
  const std::vector<int32_t> row_counts = RowCounts();
  int32_t max_rows = 1;
  for (int32_t r : row_counts) max_rows = std::max(max_rows, r);
  Bench bench(max_rows);
  std::printf("simd target %s (kernel %s), %s, OpenBLAS kernels %s, %d threads\n\n",
              engine::simd::ActiveTargetName().c_str(), engine::cpu::SmallGemmKernelName(),
              CpuModel().c_str(), engine::cpu::BlasCoreName(), omp_get_max_threads());
  std::printf("GFLOP/s of SmallBatchGemm per layer shape (in->out); all: the whole set\n\n");
  std::printf("| rows |");
  for (const Shape& s : kShapes) std::printf(" %d->%d |", s.in, s.out);
  std::printf(" all | sgemm all |\n|---:|");
  for (int i = 0; i <= kNumShapes + 1; ++i) std::printf("---:|");
  std::printf("\n");
  for (int32_t rows : row_counts) bench.Row(rows, absl::GetFlag(FLAGS_reps));
  return 0;
}
