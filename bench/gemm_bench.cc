// The CPU backend's two GEMM paths side by side: the weight-streaming kernel
// (SmallBatchGemm) and OpenBLAS sgemm, for the linear layers of llama-110m (one call per
// layer shape, weights bigger than the caches), at several row counts. The backend uses
// our kernel at every row count (its result for a row does not depend on the other rows
// or the threads); sgemm is the speed it is measured against.
//
//   build/bench/gemm_bench [--rows=1,2,4,8,16,32,48,64,96,128,256] [--reps=3]
#include <cblas.h>
#include <omp.h>

#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench/bench_util.h"
#include "engine/cpu/blas_setup.h"
#include "engine/cpu/small_gemm.h"

ABSL_FLAG(std::string, rows, "1,2,4,8,16,32,48,64,96,128,256", "Row counts to time");
ABSL_FLAG(int32_t, reps, 3, "Timed passes per row count (the best is reported)");

namespace {

using namespace superpose;  // NOLINT

struct Shape {
  int32_t out, in;
};

// llama-110m: wqkv, wo, gate_up, down per layer (x12) and the lm head.
const Shape kShapes[] = {{1280, 768}, {768, 768}, {4096, 768}, {768, 2048}};
constexpr int kLayers = 12;

}  // namespace

int main(int argc, char** argv) {
  engine::cpu::EnsureBlasCoreType(argv);
  absl::ParseCommandLine(argc, argv);
  std::printf("streaming kernel: %s, OpenBLAS kernels: %s, threads: %d\n",
              engine::cpu::SmallGemmKernelName(), engine::cpu::BlasCoreName(),
              omp_get_max_threads());
  std::vector<int32_t> row_counts;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_rows), ',')) {
    int32_t r;
    if (absl::SimpleAtoi(s, &r) && r > 0) row_counts.push_back(r);
  }
  int32_t max_rows = 1;
  for (int32_t r : row_counts) max_rows = std::max(max_rows, r);
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> ud(-1.0f, 1.0f);
  // Separate weights per layer so that a pass streams ~300 MB, as a decode step does.
  std::vector<std::vector<float>> ws;
  double flops_per_row = 0;
  for (int l = 0; l < kLayers; ++l) {
    for (const Shape& s : kShapes) {
      ws.emplace_back(static_cast<size_t>(s.out) * s.in);
      for (float& v : ws.back()) v = ud(rng);
      flops_per_row += 2.0 * s.out * s.in;
    }
  }
  std::vector<float> x(static_cast<size_t>(max_rows) * 4096),
      y(static_cast<size_t>(max_rows) * 4096);
  for (float& v : x) v = ud(rng);
  auto pass = [&](int32_t rows, bool blas) {
    size_t i = 0;
    for (int l = 0; l < kLayers; ++l) {
      for (const Shape& s : kShapes) {
        const float* w = ws[i++].data();
        if (blas) {
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, s.out, s.in, 1.0f, x.data(),
                      s.in, w, s.in, 0.0f, y.data(), s.out);
        } else {
          engine::cpu::SmallBatchGemm(x.data(), rows, s.in, w, s.out, y.data());
        }
      }
    }
  };
  std::printf(
      "\n| rows | streaming ms/pass | sgemm ms/pass | streaming GFLOP/s | sgemm GFLOP/s |\n");
  std::printf("|---:|---:|---:|---:|---:|\n");
  for (int32_t rows : row_counts) {
    double best[2] = {1e30, 1e30};
    for (int rep = 0; rep < absl::GetFlag(FLAGS_reps); ++rep) {
      for (int b = 0; b < 2; ++b) {  // interleaved, so both see the same machine load
        const double t0 = bench::NowS();
        pass(rows, b == 1);
        best[b] = std::min(best[b], bench::NowS() - t0);
      }
    }
    std::printf("| %d | %.2f | %.2f | %.1f | %.1f |\n", rows, best[0] * 1e3, best[1] * 1e3,
                flops_per_row * rows / best[0] / 1e9, flops_per_row * rows / best[1] / 1e9);
    std::fflush(stdout);
  }
  return 0;
}
