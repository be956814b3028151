// The bf16-weight GEMM (engine/cpu/bf16_gemm.h) on every kernel this CPU has: AMX,
// AVX512-BF16, and the widening kernel (float32 FMA) on every SIMD target, for the
// linear layers of llama-110m (12 layers, one call per layer shape: ~140 MB of bf16
// weights per pass, much more than the caches, as a decode step streams them).
// Reports ms per pass, the weight bytes streamed per second, and that rate as a share of
// the read-only memory bandwidth measured in the same run (the batch-1 limit).
//
//   build/bench/bf16_gemm_bench [--rows=1,4,16,64,512] [--reps=3]
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
#include "engine/cpu/bf16_gemm.h"
#include "engine/simd.h"

ABSL_FLAG(std::string, rows, "1,4,16,64,512", "Row counts to time");
ABSL_FLAG(int32_t, reps, 3, "Timed passes per row count (the best is reported)");

namespace {

using namespace superpose;  // NOLINT

struct Shape {
  int32_t out, in;
};
// llama-110m: wqkv, wo, gate_up, down per layer (x12).
const Shape kShapes[] = {{1280, 768}, {768, 768}, {4096, 768}, {768, 2048}};
constexpr int kLayers = 12;

struct Variant {
  engine::cpu::Bf16Kernel kernel;
  int64_t target;  // SIMD target (widening kernel), 0 otherwise
  std::string name;
};

std::vector<Variant> Variants() {
  using engine::cpu::Bf16Kernel;
  std::vector<Variant> out;
  for (Bf16Kernel k : {Bf16Kernel::kAmx, Bf16Kernel::kAvx512Bf16}) {
    if (engine::cpu::Bf16KernelAvailable(k)) out.push_back({k, 0, engine::cpu::Bf16KernelName(k)});
  }
  for (int64_t t : engine::simd::AvailableTargets()) {
    out.push_back({Bf16Kernel::kWiden, t, "widen/" + engine::simd::TargetName(t)});
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  std::vector<int32_t> row_counts;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_rows), ',')) {
    int32_t r;
    if (absl::SimpleAtoi(s, &r) && r > 0) row_counts.push_back(r);
  }
  int32_t max_rows = 1;
  for (int32_t r : row_counts) max_rows = std::max(max_rows, r);
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> ud(-1.0f, 1.0f);
  std::vector<engine::cpu::PackedBf16> ws;
  double bytes = 0, flops_per_row = 0;
  int32_t max_out = 0, max_in = 0;
  for (int l = 0; l < kLayers; ++l) {
    for (const Shape& s : kShapes) {
      std::vector<float> w(static_cast<size_t>(s.out) * s.in);
      for (float& v : w) v = ud(rng);
      ws.emplace_back().Pack(w.data(), s.out, s.in);
      bytes += static_cast<double>(ws.back().bytes());
      flops_per_row += 2.0 * s.out * s.in;
      max_out = std::max(max_out, s.out);
      max_in = std::max(max_in, s.in);
    }
  }
  std::vector<float> x(static_cast<size_t>(max_rows) * max_in),
      y(static_cast<size_t>(max_rows) * max_out);
  for (float& v : x) v = ud(rng);
  const double read_bw = bench::ReadBandwidth();
  std::printf(
      "CPU: %s, threads: %d, SIMD targets: %s (best first), read bandwidth %.1f GB/s, "
      "weights %.0f MB bf16 per pass\n\n",
      bench::CpuModel().c_str(), omp_get_max_threads(), engine::simd::ActiveTargetName().c_str(),
      read_bw / 1e9, bytes / 1e6);
  std::printf("| kernel | rows | ms/pass | weight GB/s | %% of read bw | GFLOP/s |\n");
  std::printf("|---|---:|---:|---:|---:|---:|\n");
  for (const Variant& v : Variants()) {
    std::unique_ptr<engine::simd::ScopedTarget> scoped;
    if (v.target != 0) scoped = std::make_unique<engine::simd::ScopedTarget>(v.target);
    for (int32_t rows : row_counts) {
      double best = 1e30;
      for (int rep = 0; rep <= absl::GetFlag(FLAGS_reps); ++rep) {  // pass 0 warms up
        const double t0 = bench::NowS();
        for (const engine::cpu::PackedBf16& w : ws) {
          engine::cpu::Bf16GemmWith(v.kernel, x.data(), rows, w, y.data());
        }
        if (rep > 0) best = std::min(best, bench::NowS() - t0);
      }
      std::printf("| %s | %d | %.2f | %.1f | %.0f%% | %.1f |\n", v.name.c_str(), rows, best * 1e3,
                  bytes / best / 1e9, 100.0 * bytes / best / read_bw,
                  flops_per_row * rows / best / 1e9);
    }
  }
  return 0;
}
