// Batch-1 decode tokens/s of weight-only quantization on the CPU backend (issue 17 item 2):
// the same generated model run with float32, bfloat16, int8 and q4 weights (--cpu_dtype
// of the server; int8 / q4 quantized at load with the converter's own code), each next to
// its memory-bandwidth floor: bytes streamed per token (the projections and LM head in
// the weight type, with int8 scales and q4 tables; norms in float32; one embedding row)
// over the read bandwidth measured in this run.
//
//   build/bench/quant_bench [--models=llama-110m] [--dtypes=float32,bfloat16,int8,q4]
//                           [--steps=64] [--threads=0] [--simd=auto]
// A model name with a '/' is a model directory (a superpose-quantize output runs with
// --dtypes=auto). Idle OpenMP workers wait as in the server (server/omp_wait.h).
#include <omp.h>

#include <algorithm>
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
#include "engine/cpu/quant_gemm.h"
#include "engine/model/quantize.h"
#include "engine/runtime/model_bundle.h"
#include "engine/simd.h"
#include "server/omp_wait.h"

ABSL_FLAG(std::string, models, "llama-110m",
          "llama-110m, llama-350m (generated, bench/genmodel) or a model directory");
ABSL_FLAG(std::string, dtypes, "float32,bfloat16,int8,q4", "CPU weight types (--cpu_dtype)");
ABSL_FLAG(int32_t, steps, 64, "Decode steps to time per row");
ABSL_FLAG(int32_t, threads, 0, "Backend threads (0: all cores)");
ABSL_FLAG(std::string, simd, "auto", "Cap the SIMD target of the CPU kernels (as the server)");
ABSL_FLAG(std::string, workdir, "/tmp/superpose-bench", "Where generated models are written");

namespace {

using namespace superpose;  // NOLINT

constexpr int32_t kBlock = 16;
constexpr int32_t kWarmup = 4;

// Bytes of one projection W[rows, in] streamed per step in `type`.
double ProjectionBytes(const std::string& type, double rows, int64_t in) {
  if (type == "int8") return rows * in + rows * 4;  // codes + float32 scales
  if (type == "q4") {
    return rows * engine::Q4RowBytes(in) + engine::Q4Groups(in) * engine::kQ4Levels * 4.0;
  }
  return rows * in * (type == "bfloat16" ? 2.0 : 4.0);
}

// Bytes read per decode step by the CPU backend running `type` (see the banner).
double BytesPerToken(const engine::ModelConfig& c, const std::string& type) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, D = c.head_dim;
  const int64_t nq = c.num_heads * D, nkv = c.num_kv_heads * D;
  const double layer = ProjectionBytes(type, nq + 2.0 * nkv, H) + ProjectionBytes(type, H, nq) +
                       ProjectionBytes(type, 2.0 * I, H) + ProjectionBytes(type, H, I) + 2 * H * 4;
  // A tied head is the embedding, float32 (bf16 when the weights are) even when quantized.
  const std::string head = c.tie_word_embeddings && type != "bfloat16" ? "float32" : type;
  return layer * c.num_layers + ProjectionBytes(head, c.vocab_size, H) + H * 4.0 + H * 4.0;
}

// Seconds of `steps` greedy batch-1 decode steps (after kWarmup untimed ones).
absl::StatusOr<double> TimeDecode(engine::Backend& backend, int32_t vocab, int32_t steps) {
  engine::BatchPlan plan;
  plan.seqs.resize(1);
  plan.seqs[0].num_tokens = 1;
  plan.tokens = {1};
  plan.positions = {0};
  plan.kv_slots = {{0, 0}};
  plan.logits_for = {0};
  engine::ForwardOutput out;
  double t0 = 0;
  for (int32_t s = 0; s < steps + kWarmup; ++s) {
    if (s == kWarmup) t0 = bench::NowS();
    plan.kv_slots[0] = {s / kBlock, s % kBlock};
    plan.positions[0] = static_cast<float>(s);
    plan.seqs[0].context.clear();
    for (int32_t done = 0, b = 0; done < s; ++b) {
      const int32_t len = std::min(kBlock, s - done);
      plan.seqs[0].context.push_back({b, 0, len});
      done += len;
    }
    if (auto st = backend.Forward(plan, &out); !st.ok()) return st;
    plan.tokens[0] = static_cast<int32_t>(
        std::max_element(out.logits.begin(), out.logits.begin() + vocab) - out.logits.begin());
  }
  return bench::NowS() - t0;
}

absl::StatusOr<engine::ModelBundle> GetModel(const std::string& name) {
  if (name.find('/') != std::string::npos) return engine::LoadModelBundle(name);
  return bench::GeneratedModel(name, absl::GetFlag(FLAGS_workdir));
}

// One table row: load `dtype`, time it, print.
bool RunRow(const std::string& name, const engine::ModelBundle& m, const std::string& dtype,
            double bw) {
  engine::BackendOptions opts;
  opts.num_threads = absl::GetFlag(FLAGS_threads);
  const int32_t steps = absl::GetFlag(FLAGS_steps);
  opts.kv_num_blocks = std::max(8, (steps + kWarmup + kBlock - 1) / kBlock);
  opts.kv_block_size = kBlock;
  auto cpu = engine::cpu::ParseCpuOptions({{"cpu_dtype", dtype}});
  if (!cpu.ok()) {
    std::fprintf(stderr, "%s\n", cpu.status().ToString().c_str());
    return false;
  }
  engine::cpu::CpuBackend backend(opts, *cpu);
  const double t0 = bench::NowS();
  if (auto st = backend.Load(m.config, *m.weights, engine::Shard{}); !st.ok()) {
    std::fprintf(stderr, "load: %s\n", st.ToString().c_str());
    return false;
  }
  const double load_s = bench::NowS() - t0;
  absl::StatusOr<double> dt = TimeDecode(backend, m.config.vocab_size, steps);
  if (!dt.ok()) {
    std::fprintf(stderr, "forward: %s\n", dt.status().ToString().c_str());
    return false;
  }
  const double bytes = BytesPerToken(m.config, backend.compute_dtype());
  const double tok_s = steps / *dt, floor = bw / bytes;
  std::printf("| %s | %s | %.1f | %.1f | %.1f | %.0f%% | %.1f |\n", name.c_str(),
              backend.compute_dtype().c_str(), bytes / 1e6, tok_s, floor, 100.0 * tok_s / floor,
              load_s);
  return true;
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
  const double bw = bench::ReadBandwidth();
  std::printf("CPU: %s, threads: %d, simd: %s, dequant kernel: %s, OpenMP wait: %s\n",
              bench::CpuModel().c_str(), omp_get_max_threads(),
              engine::simd::ActiveTargetName().c_str(), engine::cpu::QuantGemmKernelName(),
              omp_wait::Describe().c_str());
  std::printf("read bandwidth (all threads): %.2f GB/s\n\n", bw / 1e9);
  std::printf(
      "| model | weights | MB read / token | decode tok/s (batch 1) | floor tok/s | "
      "vs floor | load s |\n|---|---|---:|---:|---:|---:|---:|\n");
  for (absl::string_view name : absl::StrSplit(absl::GetFlag(FLAGS_models), ',')) {
    auto model = GetModel(std::string(name));
    if (!model.ok()) {
      std::fprintf(stderr, "%s: %s\n", std::string(name).c_str(),
                   model.status().ToString().c_str());
      return 1;
    }
    for (absl::string_view dtype : absl::StrSplit(absl::GetFlag(FLAGS_dtypes), ',')) {
      if (!RunRow(std::string(name), *model, std::string(dtype), bw)) return 1;
    }
  }
  std::printf(
      "\nfloor = read bandwidth / bytes read per token; load s includes load-time "
      "quantization (int8, q4)\n");
  return 0;
}
