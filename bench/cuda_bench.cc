// GPU benchmark of the CUDA backend on a Llama-shaped random-weight model whose bf16
// weights are generated on the device (no file, no host copy), next to two ceilings
// measured in the same run:
//   - decode step time at batch 1, 8, 64 vs the floor weight bytes / device bandwidth,
//     where the bandwidth is that of a device-to-device cudaMemcpy counting bytes read
//     plus bytes written (a decode step reads every weight once); each batch size with
//     kernels launched one by one (eager) and replayed from CUDA graphs (the default),
//     with whole logits rows copied to the host and with compact rows (the row's best
//     token, what the engine asks for greedy requests);
//   - prefill tokens/s vs the cuBLAS bf16 GEMM rate (8192^3, bf16 in, float32 out and
//     accumulation, as the backend calls it): ceiling = rate / (2 * matrix params).
//
//   build/bench/cuda_bench [--shape=llama-8b] [--batches=1,8,64] [--steps=20]
//                          [--context=256] [--prefill=4x1024] [--split_decode=true]
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "cuda/cuda_backend.h"
#include "cuda/cuda_util.h"
#include "engine/model/builtin.h"

ABSL_FLAG(std::string, shape, "llama-8b", "llama-8b | llama-1b | llama-110m");
ABSL_FLAG(std::string, batches, "1,8,64", "Decode batch sizes");
ABSL_FLAG(int32_t, steps, 20, "Timed decode steps per batch size (after 3 warm-up steps)");
ABSL_FLAG(int32_t, context, 256, "Cached tokens per sequence in decode steps");
ABSL_FLAG(std::string, prefill, "4x1024", "Prefill step: SEQSxTOKENS");
ABSL_FLAG(bool, split_decode, true,
          "Split-K decode attention for small batches (CudaOptions::split_decode)");
ABSL_FLAG(std::string, attention, "auto",
          "Prefill attention kernel: auto | simt | tensor_core (CudaOptions::attention)");
ABSL_FLAG(std::string, dtype, "bf16",
          "Projection weights: bf16 | int8 | q4 (random codes kept quantized, the "
          "dequantizing kernels; CudaOptions::dtype)");

namespace {

using namespace superpose;  // NOLINT

double NowS() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

#define CHECK_CUDA(expr)                                               \
  do {                                                                 \
    cudaError_t e_ = (expr);                                           \
    if (e_ != cudaSuccess) {                                           \
      std::fprintf(stderr, "%s: %s\n", #expr, cudaGetErrorString(e_)); \
      std::exit(1);                                                    \
    }                                                                  \
  } while (0)

void CheckOk(const absl::Status& st, const char* what) {
  if (!st.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, st.ToString().c_str());
    std::exit(1);
  }
}

// Best time in ms of 5 runs of `fn` (after one warm-up run), timed with CUDA events on
// the legacy stream.
template <typename Fn>
float BestEventMs(Fn fn) {
  cudaEvent_t e0, e1;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));
  float best = 1e30f;
  for (int r = 0; r < 6; ++r) {
    CHECK_CUDA(cudaEventRecord(e0));
    fn();
    CHECK_CUDA(cudaEventRecord(e1));
    CHECK_CUDA(cudaEventSynchronize(e1));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    if (r > 0) best = std::min(best, ms);
  }
  CHECK_CUDA(cudaEventDestroy(e0));
  CHECK_CUDA(cudaEventDestroy(e1));
  return best;
}

// Device copy bandwidth, bytes read + written per second (best of 5, 2 GiB).
double CopyBandwidth() {
  const size_t bytes = size_t{2} << 30;
  cuda::DeviceArray<char> a, b;
  CheckOk(a.Allocate(bytes), "alloc");
  CheckOk(b.Allocate(bytes), "alloc");
  CHECK_CUDA(cudaMemset(a.get(), 1, bytes));
  const float best = BestEventMs(
      [&] { CHECK_CUDA(cudaMemcpyAsync(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice)); });
  return 2.0 * static_cast<double>(bytes) / (best * 1e-3);
}

// cuBLAS bf16 GEMM FLOP/s at 8192^3 on random data (best of 5).
double GemmRate() {
  const int32_t n = 8192;
  const size_t nn = static_cast<size_t>(n) * n;
  cuda::DeviceArray<cuda::bf16> x, w;
  cuda::DeviceArray<float> y;
  CheckOk(x.Allocate(nn), "alloc");
  CheckOk(w.Allocate(nn), "alloc");
  CheckOk(y.Allocate(nn), "alloc");
  CHECK_CUDA(cuda::LaunchFillRandom(x.get(), nn, 1, 1.0f, nullptr));
  CHECK_CUDA(cuda::LaunchFillRandom(w.get(), nn, 2, 1.0f, nullptr));
  cublasHandle_t h;
  if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) std::exit(1);
  const float best =
      BestEventMs([&] { CheckOk(cuda::GemmBf16(h, x.get(), n, n, w.get(), n, y.get()), "gemm"); });
  cublasDestroy(h);
  return 2.0 * n * static_cast<double>(n) * n / (best * 1e-3);
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  std::string why;
  if (!cuda::CudaAvailable(&why)) {
    std::fprintf(stderr, "cuda_bench: no usable CUDA device: %s\n", why.c_str());
    return 1;
  }
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, %.1f GiB\n", prop.name, prop.multiProcessorCount,
              prop.totalGlobalMem / 1073741824.0);

  const std::string shape = absl::GetFlag(FLAGS_shape);
  engine::ModelConfig cfg;
  if (shape == "llama-8b") {
    cfg = engine::LlamaShapedConfig(4096, 32, 32, 8, 14336, 128256);
  } else if (shape == "llama-1b") {
    cfg = engine::LlamaShapedConfig(2048, 16, 32, 8, 8192, 128256);
  } else if (shape == "llama-110m") {
    cfg = engine::LlamaShapedConfig(768, 12, 12, 4, 2048, 32000);
  } else {
    std::fprintf(stderr, "--shape: unknown %s\n", shape.c_str());
    return 2;
  }

  const double bw = CopyBandwidth();
  std::printf("device copy bandwidth (read + written): %.0f GB/s\n", bw / 1e9);
  const double gemm = GemmRate();
  std::printf("cuBLAS bf16 GEMM 8192^3 (float32 out): %.0f TFLOP/s\n", gemm / 1e12);

  std::vector<int32_t> batches;
  for (absl::string_view b : absl::StrSplit(absl::GetFlag(FLAGS_batches), ',')) {
    int32_t v = 0;
    if (absl::SimpleAtoi(b, &v) && v > 0) batches.push_back(v);
  }
  int32_t pf_seqs = 4, pf_tokens = 1024;
  {
    std::vector<std::string> p = absl::StrSplit(absl::GetFlag(FLAGS_prefill), 'x');
    if (p.size() != 2 || !absl::SimpleAtoi(p[0], &pf_seqs) || !absl::SimpleAtoi(p[1], &pf_tokens) ||
        pf_seqs < 1 || pf_tokens < 1) {
      std::fprintf(stderr, "--prefill: want SEQSxTOKENS\n");
      return 2;
    }
  }
  const int32_t context = absl::GetFlag(FLAGS_context);
  const int32_t steps = absl::GetFlag(FLAGS_steps);
  const int32_t bs = 16;
  const int32_t max_b = *std::max_element(batches.begin(), batches.end());
  const int32_t blocks_per_seq = (context + steps + 3 + bs) / bs + 1;
  const int32_t pf_blocks = pf_seqs * ((pf_tokens + bs - 1) / bs);

  engine::BackendOptions opts;
  opts.kv_block_size = bs;
  opts.kv_num_blocks = std::max(max_b * blocks_per_seq, pf_blocks) + 1;
  absl::StatusOr<cuda::CudaOptions> copts = cuda::ParseCudaOptions(
      {{"cuda_attention", absl::GetFlag(FLAGS_attention)},
       {"cuda_split_decode", absl::GetFlag(FLAGS_split_decode) ? "true" : "false"},
       {"cuda_dtype", absl::GetFlag(FLAGS_dtype)}});
  CheckOk(copts.status(), "--attention/--split_decode/--dtype");
  cuda::CudaBackend backend(opts, *copts, 0);
  const double t0 = NowS();
  CheckOk(backend.LoadRandom(cfg, engine::Shard{}, 42), "load");
  // Quantized: the bytes the backend holds (codes, scales, tables, bf16 embedding).
  const std::string dtype = backend.compute_dtype();
  const int64_t wbytes =
      dtype == "bfloat16" ? cfg.WeightBytes(engine::DType::kBF16) : backend.weight_bytes();
  std::printf(
      "model %s: %.2f B params, %.2f GB %s weights read per step, init %.1f s, "
      "KV pool %d blocks, attention tile %d tokens\n",
      shape.c_str(), cfg.NumParameters() / 1e9, wbytes / 1e9, dtype.c_str(), NowS() - t0,
      backend.kv().num_blocks, backend.attention_tile_tokens());

  struct Row {
    int32_t batch;
    double eager_ms, graph_ms, compact_ms, sampled_ms, floor_ms;
    bool graphs;  // every timed step replayed a graph
  };
  std::vector<Row> rows;
  // B sequences, each with `context` cached tokens (the contents do not matter for
  // timing) in its own blocks, decoding one token per step; logits for every row, whole
  // (top = 0) or compact (its `top` best tokens). Returns ms per step (after 3 warm-up
  // steps, which also capture the graph).
  auto time_decode = [&](int32_t B, bool graphs, int32_t top, bool sample) {
    backend.set_cuda_graphs(graphs);
    engine::BatchPlan plan;
    for (int32_t s = 0; s < B; ++s) {
      engine::SeqPlan sp;
      sp.id = s;
      sp.token_begin = s;
      sp.num_tokens = 1;
      plan.seqs.push_back(sp);
      plan.tokens.push_back(1 + s);
      plan.positions.push_back(0);
      plan.kv_slots.push_back({0, 0});
      plan.logits_for.push_back(s);
      if (top > 0) plan.logits_top.push_back(top);
      if (sample) {
        engine::RowSampling rs;
        rs.temperature = 1.0f;
        rs.top_p = 0.9f;
        rs.seed = static_cast<uint64_t>(s);
        plan.sampling.push_back(rs);
      }
    }
    double total = 0;
    for (int32_t step = 0; step < steps + 3; ++step) {
      const int32_t len = context + step;
      for (int32_t s = 0; s < B; ++s) {
        const int32_t base = s * blocks_per_seq;
        auto& ctx = plan.seqs[s].context;
        ctx.clear();
        for (int32_t done = 0, b = 0; done < len; ++b) {
          const int32_t n = std::min(bs, len - done);
          ctx.push_back({base + b, 0, n});
          done += n;
        }
        plan.positions[s] = static_cast<float>(len);
        plan.kv_slots[s] = {base + len / bs, len % bs};
      }
      engine::ForwardOutput out;
      const double ts = NowS();
      CheckOk(backend.Forward(plan, &out), "decode");
      if (step >= 3) total += NowS() - ts;
    }
    return 1e3 * total / steps;
  };
  for (int32_t B : batches) {
    Row row{B, 0, 0, 0, 0, 1e3 * wbytes / bw, false};
    row.eager_ms = time_decode(B, false, 0, false);
    const int64_t replays0 = backend.graph_stats().replays;
    row.graph_ms = time_decode(B, true, 0, false);
    row.compact_ms = time_decode(B, true, 1, false);
    row.sampled_ms = time_decode(B, true, 0, true);
    row.graphs = backend.graph_stats().replays - replays0 >= 3 * steps;
    rows.push_back(row);
    std::printf(
        "decode batch %d: %.3f ms/step eager, %.3f ms/step %s, %.3f ms/step with compact rows, "
        "%.3f ms/step sampled on the GPU\n",
        B, row.eager_ms, row.graph_ms, row.graphs ? "with CUDA graphs" : "(CUDA graphs NOT used)",
        row.compact_ms, row.sampled_ms);
  }
  const cuda::CudaBackend::GraphStats gs = backend.graph_stats();

  // Prefill: pf_seqs sequences of pf_tokens new tokens each, logits of the last tokens.
  engine::BatchPlan plan;
  for (int32_t s = 0; s < pf_seqs; ++s) {
    engine::SeqPlan sp;
    sp.id = s;
    sp.token_begin = s * pf_tokens;
    sp.num_tokens = pf_tokens;
    plan.seqs.push_back(sp);
    const int32_t base = s * ((pf_tokens + bs - 1) / bs);
    for (int32_t i = 0; i < pf_tokens; ++i) {
      plan.tokens.push_back(1 + (i * 7919) % 1000);
      plan.positions.push_back(static_cast<float>(i));
      plan.kv_slots.push_back({base + i / bs, i % bs});
    }
    plan.logits_for.push_back(sp.token_begin + pf_tokens - 1);
  }
  double best = 1e30;
  for (int r = 0; r < 4; ++r) {
    engine::ForwardOutput out;
    const double ts = NowS();
    CheckOk(backend.Forward(plan, &out), "prefill");
    if (r > 0) best = std::min(best, NowS() - ts);
  }
  const double matrix_params =
      static_cast<double>(cfg.NumParameters()) -
      static_cast<double>(cfg.vocab_size) * cfg.hidden_size * (cfg.tie_word_embeddings ? 1 : 2);
  const double pf_tok_s = pf_seqs * pf_tokens / best;
  const double pf_ceiling = gemm / (2.0 * matrix_params);

  std::printf("\n## cuda_bench summary (%s, %s weights, %s, attention %s, split decode %s)\n\n",
              shape.c_str(), dtype.c_str(), prop.name, absl::GetFlag(FLAGS_attention).c_str(),
              copts->split_decode ? "on" : "off");
  std::printf("device copy bandwidth %.0f GB/s (read + written); cuBLAS bf16 GEMM %.0f TFLOP/s\n\n",
              bw / 1e9, gemm / 1e12);
  std::printf(
      "| decode batch | context | eager ms | graphs ms | graphs speedup | graphs + compact ms "
      "| graphs + sampled ms | floor ms | floor/step | tok/s |\n");
  std::printf("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const Row& r : rows) {
    std::printf("| %d | %d | %.3f | %.3f%s | %.2fx | %.3f | %.3f | %.3f | %.0f%% | %.0f |\n",
                r.batch, context, r.eager_ms, r.graph_ms, r.graphs ? "" : " (no graph)",
                r.eager_ms / r.graph_ms, r.compact_ms, r.sampled_ms, r.floor_ms,
                100.0 * r.floor_ms / r.compact_ms, r.batch * 1e3 / r.compact_ms);
  }
  std::printf(
      "\neager: kernels launched one by one, whole logits rows to the host; graphs: the step "
      "replayed from a CUDA graph (the default), whole rows; graphs + compact: and only each "
      "row's best token to the host (the engine's greedy path); graphs + sampled: each row "
      "drawn on the GPU (T=1, top_p=0.9; the engine's path for such requests); floor/step and "
      "tok/s with graphs + compact. %d graphs, %.1f MiB of graph memory.\n",
      gs.graphs, gs.device_bytes / 1048576.0);
  std::printf(
      "\n| prefill | tokens/s | GEMM ceiling tokens/s | of ceiling |\n|---|---:|---:|---:|\n");
  std::printf("| %d x %d | %.0f | %.0f | %.0f%% |\n", pf_seqs, pf_tokens, pf_tok_s, pf_ceiling,
              100.0 * pf_tok_s / pf_ceiling);
  std::printf(
      "\nfloor ms = %.2f GB of weights / copy bandwidth; decode steps include the "
      "logits copy to the host. GEMM ceiling = GEMM rate / (2 x "
      "%.2f B matrix params), attention FLOPs not counted.\n",
      wbytes / 1e9, matrix_params / 1e9);
  return 0;
}
