// Decode tokens/s at batch 1 on the CPU backend, next to the floor set by memory
// bandwidth (weight bytes per token over the copy bandwidth measured in this run).
//
//   build/bench/decode_bench [--shared=../shared] [--steps=64] [--threads=0]
//                            [--models=stories260k,llama-110m,llama-350m]
//                            [--dtypes=float32,bfloat16]
// Each model runs once per weight type (--cpu_dtype of the server); the floor counts the
// bytes of that type.
#include <omp.h>

#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_split.h"
#include "bench/bench_models.h"
#include "bench/bench_util.h"
#include "engine/cpu/blas_setup.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/runtime/model_bundle.h"

ABSL_FLAG(std::string, shared, "../shared", "Path of shared/ (for stories260k)");
ABSL_FLAG(int32_t, steps, 64, "Decode steps to time per model");
ABSL_FLAG(int32_t, threads, 0, "Backend threads (0: all cores)");
ABSL_FLAG(std::string, models, "stories260k,llama-110m,llama-350m", "Models to run");
ABSL_FLAG(std::string, dtypes, "float32,bfloat16", "CPU weight types to run (float32, bfloat16)");
ABSL_FLAG(std::string, workdir, "/tmp/superpose-bench", "Where generated models are written");

namespace {

using namespace superpose;  // NOLINT

struct Row {
  std::string model;
  std::string dtype;
  double params_m;
  double weight_mb;
  double tok_s;
  double floor_tok_s;
};

absl::StatusOr<engine::ModelBundle> GetModel(const std::string& name) {
  if (name == "stories260k") {
    return engine::LoadModelBundle(absl::GetFlag(FLAGS_shared) + "/fixtures/stories260k");
  }
  return bench::GeneratedModel(name, absl::GetFlag(FLAGS_workdir));
}

}  // namespace

int main(int argc, char** argv) {
  engine::cpu::EnsureBlasCoreType(argv);
  absl::ParseCommandLine(argc, argv);
  const double bw = bench::CopyBandwidth();
  std::printf("OpenBLAS kernels: %s, threads: %d\n", engine::cpu::BlasCoreName(),
              omp_get_max_threads());
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
      opts.kv_num_blocks = 64;
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
      const int32_t steps = absl::GetFlag(FLAGS_steps);
      // Decode `steps` tokens after a 1-token prompt; the first 4 are warm-up.
      engine::ForwardOutput out;
      engine::BatchPlan plan;
      plan.seqs.resize(1);
      plan.seqs[0].num_tokens = 1;
      plan.logits_for = {0};
      plan.tokens = {1};
      plan.positions = {0};
      double t0 = 0;
      const int warmup = 4;
      for (int32_t s = 0; s < steps + warmup; ++s) {
        if (s == warmup) t0 = bench::NowS();
        plan.kv_slots = {{s / 16, s % 16}};
        plan.positions = {static_cast<float>(s)};
        if (auto st = backend.Forward(plan, &out); !st.ok()) {
          std::fprintf(stderr, "forward: %s\n", st.ToString().c_str());
          return 1;
        }
        // Context for the next step: everything computed so far.
        plan.seqs[0].context.clear();
        for (int32_t done = 0, b = 0; done < s + 1; ++b) {
          const int32_t len = std::min(16, s + 1 - done);
          plan.seqs[0].context.push_back({b, 0, len});
          done += len;
        }
        plan.tokens = {static_cast<int32_t>(std::max_element(out.logits.begin(), out.logits.end()) -
                                            out.logits.begin())};
      }
      const double dt = bench::NowS() - t0;
      // Every weight is read once per token, in the backend's weight type.
      const bool bf16 = backend.compute_dtype() == "bfloat16";
      const double bytes = static_cast<double>(
          model->config.WeightBytes(bf16 ? engine::DType::kBF16 : engine::DType::kF32));
      rows.push_back({std::string(name), backend.compute_dtype(),
                      model->config.NumParameters() / 1e6, bytes / 1e6, steps / dt, bw / bytes});
    }
  }
  std::printf(
      "| model | weights | params (M) | weight MB | decode tok/s (batch 1) | floor tok/s | vs "
      "floor |\n");
  std::printf("|---|---|---:|---:|---:|---:|---:|\n");
  for (const Row& r : rows) {
    std::printf("| %s | %s | %.1f | %.1f | %.1f | %.1f | %.0f%% |\n", r.model.c_str(),
                r.dtype.c_str(), r.params_m, r.weight_mb, r.tok_s, r.floor_tok_s,
                100.0 * r.tok_s / r.floor_tok_s);
  }
  std::printf(
      "\nfloor = copy bandwidth / weight bytes read per token (in the weight type; bf16 kernel: "
      "%s); a model that fits in the caches can exceed 100%%\n",
      engine::cpu::Bf16GemmKernelName());
  return 0;
}
