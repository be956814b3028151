// Decode tokens/s on the CPU backend (batch 1, and N sequences in lock-step with
// --batch), next to the floor set by memory bandwidth (weight bytes per token over the
// copy bandwidth measured in this run).
//
//   build/bench/decode_bench [--shared=../shared] [--steps=64] [--threads=0]
//                            [--models=stories260k,llama-110m,llama-350m]
//                            [--dtypes=float32,bfloat16] [--batch=1] [--simd=auto]
// Each model runs once per weight type (--cpu_dtype of the server) and batch size; the
// floor counts the bytes of that type. A model name with a '/' is a model directory.
// Idle OpenMP workers wait as in the server (server/omp_wait.h).
#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "bench/bench_models.h"
#include "bench/bench_util.h"
#include "bench/lockstep_decode.h"
#include "engine/cpu/blas_setup.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/runtime/model_bundle.h"
#include "engine/simd.h"
#include "server/omp_wait.h"

ABSL_FLAG(std::string, shared, "../shared", "Path of shared/ (for stories260k)");
ABSL_FLAG(int32_t, steps, 64, "Decode steps to time per model");
ABSL_FLAG(int32_t, threads, 0, "Backend threads (0: all cores)");
ABSL_FLAG(std::string, models, "stories260k,llama-110m,llama-350m",
          "Models to run: stories260k, llama-110m, llama-350m or a model directory (has a '/')");
ABSL_FLAG(std::string, dtypes, "float32,bfloat16", "CPU weight types to run (float32, bfloat16)");
ABSL_FLAG(std::string, batch, "1",
          "Sequences decoding in lock-step, one token each per step (comma-separated sizes)");
ABSL_FLAG(std::string, simd, "auto",
          "Cap the SIMD target of the CPU kernels (auto, or e.g. avx2, sse4; as the server)");
ABSL_FLAG(bool, bandwidth, true,
          "Measure the copy bandwidth for the floor column (false: skip it, no floor)");
ABSL_FLAG(std::string, workdir, "/tmp/superpose-bench", "Where generated models are written");

namespace {

using namespace superpose;  // NOLINT

struct Row {
  std::string model;
  std::string dtype;
  int32_t batch;
  double params_m;
  double weight_mb;
  double tok_s;
  double floor_tok_s;
};

absl::StatusOr<engine::ModelBundle> GetModel(const std::string& name) {
  if (name.find('/') != std::string::npos) return engine::LoadModelBundle(name);
  if (name == "stories260k") {
    return engine::LoadModelBundle(absl::GetFlag(FLAGS_shared) + "/fixtures/stories260k");
  }
  return bench::GeneratedModel(name, absl::GetFlag(FLAGS_workdir));
}

// Decodes `steps` tokens (after the untimed warm-up) for each of `batch` sequences in
// lock-step, greedily from a 1-token prompt; returns the seconds of the timed steps.
absl::StatusOr<double> TimeDecode(engine::Backend& backend, int32_t vocab, int32_t batch,
                                  int32_t steps) {
  return bench::TimeLockstepDecode(backend, vocab, std::vector<int64_t>(batch, 0), steps);
}

}  // namespace

int main(int argc, char** argv) {
  const bool reexec = omp_wait::SetDefault();
  engine::cpu::EnsureBlasCoreType(argv);  // may re-exec, carrying the wait setting
  if (reexec) omp_wait::ExecSelf(argv);
  absl::ParseCommandLine(argc, argv);
  if (absl::Status st = engine::simd::LimitTargets(absl::GetFlag(FLAGS_simd)); !st.ok()) {
    std::fprintf(stderr, "--simd: %s\n", std::string(st.message()).c_str());
    return 2;
  }
  std::vector<int32_t> batches;
  for (absl::string_view b : absl::StrSplit(absl::GetFlag(FLAGS_batch), ',')) {
    int32_t n;
    if (!absl::SimpleAtoi(b, &n) || n <= 0) {
      std::fprintf(stderr, "--batch: bad value '%s'\n", std::string(b).c_str());
      return 2;
    }
    batches.push_back(n);
  }
  const int32_t steps = absl::GetFlag(FLAGS_steps);
  const double bw = absl::GetFlag(FLAGS_bandwidth) ? bench::CopyBandwidth() : 0.0;
  std::printf("OpenBLAS kernels: %s, threads: %d, simd: %s, OpenMP wait: %s\n",
              engine::cpu::BlasCoreName(), omp_get_max_threads(),
              engine::simd::ActiveTargetName().c_str(), omp_wait::Describe().c_str());
  std::printf("copy bandwidth (bytes copied/s, all threads): %.2f GB/s\n\n", bw / 1e9);
  std::vector<Row> rows;
  for (absl::string_view name : absl::StrSplit(absl::GetFlag(FLAGS_models), ',')) {
    auto model = GetModel(std::string(name));
    if (!model.ok()) {
      std::fprintf(stderr, "%s: %s\n", std::string(name).c_str(),
                   model.status().ToString().c_str());
      return 1;
    }
    for (absl::string_view dtype : absl::StrSplit(absl::GetFlag(FLAGS_dtypes), ',')) {
      engine::BackendOptions opts;
      opts.num_threads = absl::GetFlag(FLAGS_threads);
      const int32_t max_batch = *std::max_element(batches.begin(), batches.end());
      opts.kv_num_blocks = std::max(64, max_batch * bench::DecodeBlocksPerSeq(steps));
      opts.kv_block_size = bench::kDecodeBlock;
      absl::StatusOr<engine::cpu::CpuOptions> cpu =
          engine::cpu::ParseCpuOptions({{"cpu_dtype", std::string(dtype)}});
      if (!cpu.ok()) {
        std::fprintf(stderr, "%s\n", cpu.status().ToString().c_str());
        return 1;
      }
      engine::cpu::CpuBackend backend(opts, *cpu);
      if (auto st = backend.Load(model->config, *model->weights, engine::Shard{}); !st.ok()) {
        std::fprintf(stderr, "load: %s\n", st.ToString().c_str());
        return 1;
      }
      // Every weight is read once per step, in the backend's weight type.
      const bool bf16 = backend.compute_dtype() == "bfloat16";
      const double bytes = static_cast<double>(
          model->config.WeightBytes(bf16 ? engine::DType::kBF16 : engine::DType::kF32));
      for (int32_t batch : batches) {
        absl::StatusOr<double> dt = TimeDecode(backend, model->config.vocab_size, batch, steps);
        if (!dt.ok()) {
          std::fprintf(stderr, "forward: %s\n", dt.status().ToString().c_str());
          return 1;
        }
        rows.push_back({std::string(name), backend.compute_dtype(), batch,
                        model->config.NumParameters() / 1e6, bytes / 1e6,
                        static_cast<double>(batch) * steps / *dt, bw / bytes});
      }
    }
  }
  std::printf(
      "| model | weights | batch | params (M) | weight MB | decode tok/s | floor tok/s (batch "
      "1) | vs floor |\n");
  std::printf("|---|---|---:|---:|---:|---:|---:|---:|\n");
  for (const Row& r : rows) {
    const std::string floor = r.floor_tok_s > 0 ? absl::StrFormat("%.1f | %.0f%%", r.floor_tok_s,
                                                                  100.0 * r.tok_s / r.floor_tok_s)
                                                : "- | -";
    std::printf("| %s | %s | %d | %.1f | %.1f | %.1f | %s |\n", r.model.c_str(), r.dtype.c_str(),
                r.batch, r.params_m, r.weight_mb, r.tok_s, floor.c_str());
  }
  std::printf(
      "\nfloor = copy bandwidth / weight bytes read per step (in the weight type; bf16 kernel: "
      "%s); a model that fits in the caches can exceed 100%%; tok/s counts every sequence\n",
      engine::cpu::Bf16GemmKernelName());
  return 0;
}
