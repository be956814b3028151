// Superposition RAG vs naive RAG on the CPU backend (issue 4): time to first token and
// counted FLOPs, NQ-Open-shaped requests (documents of ~140 tokens, a ~15-token query,
// 5 generated tokens, k = 1), cold and with the path cache warm, at 10, 20 and 50
// documents, on a generated Llama-shaped model. The engine runs in-process.
//   build/bench/rag_bench [--model=llama-110m] [--docs=10,20,50] [--reps=3]
#include <omp.h>

#include <cblas.h>

#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "bench/bench_models.h"
#include "bench/bench_util.h"
#include "engine/cpu/blas_setup.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/rag/rag.h"
#include "engine/runtime/engine.h"
#include "engine/runtime/model_bundle.h"
#include "spdlog/spdlog.h"

ABSL_FLAG(std::string, model, "llama-110m", "llama-110m | llama-350m (generated, random bf16)");
ABSL_FLAG(std::string, workdir, "/tmp/superpose-bench", "Where generated models are kept");
ABSL_FLAG(std::string, docs, "10,20,50", "Document counts");
ABSL_FLAG(int32_t, reps, 3, "Timed repetitions per cell (median reported)");
ABSL_FLAG(int32_t, doc_tokens, 140, "Mean document length (lengths vary by +-20)");
ABSL_FLAG(int32_t, query_tokens, 15, "Query length");
ABSL_FLAG(int32_t, preamble_tokens, 30, "Preamble length");
ABSL_FLAG(int32_t, postamble_tokens, 4, "Postamble length");
ABSL_FLAG(int32_t, new_tokens, 5, "Generated tokens");
ABSL_FLAG(int32_t, max_batch_tokens, 2048, "Engine step budget");
ABSL_FLAG(std::string, cpu_dtype, "auto", "CPU weight type: auto | float32 | bfloat16");
ABSL_FLAG(bool, warm_only, false, "Only the warm path-cache runs (for profiling)");

namespace superpose {
namespace {

namespace rag = engine::rag;

struct Sample {
  double ttft_s = 0;
  rag::Result result;
};

Sample RunOnce(engine::Engine& eng, const rag::Spec& spec) {
  engine::Request req;
  req.request_id = "bench";
  req.sampling.temperature = 0.0f;
  req.sampling.max_new_tokens = absl::GetFlag(FLAGS_new_tokens);
  req.ignore_eos = true;
  req.rag = std::make_shared<rag::Spec>(spec);
  struct State {
    absl::Mutex mu;
    bool done = false;
    double first = 0;
    absl::Status status;
    std::shared_ptr<const rag::Result> result;
  };
  auto st = std::make_shared<State>();
  const double t0 = bench::NowS();
  auto h = eng.Submit(std::move(req), [st](engine::StreamEvent&& ev) {
    absl::MutexLock lock(&st->mu);
    if (st->first == 0 && !ev.token_ids.empty()) st->first = bench::NowS();
    if (ev.finished) {
      st->done = true;
      st->status = ev.status;
      st->result = ev.rag;
    }
  });
  if (!h.ok()) {
    std::fprintf(stderr, "submit failed: %s\n", h.status().ToString().c_str());
    std::exit(1);
  }
  absl::MutexLock lock(&st->mu);
  st->mu.Await(absl::Condition(&st->done));
  if (!st->status.ok() || st->result == nullptr) {
    std::fprintf(stderr, "request failed: %s\n", st->status.ToString().c_str());
    std::exit(1);
  }
  return {st->first - t0, *st->result};
}

// NQ-Open-shaped request with random (non-special) token ids; `salt` makes documents
// unique so that nothing is cached unless asked for.
rag::Spec MakeSpec(int32_t n, int32_t vocab, uint64_t salt, rag::Mode mode, bool cache) {
  std::mt19937_64 rng(1234);
  std::mt19937_64 doc_rng(salt);
  auto tokens = [&](std::mt19937_64& r, int32_t len) {
    std::vector<int32_t> t(len);
    for (auto& x : t) x = 3 + static_cast<int32_t>(r() % (vocab - 3));
    return t;
  };
  rag::Spec s;
  s.preamble = tokens(rng, absl::GetFlag(FLAGS_preamble_tokens));
  s.preamble[0] = 1;  // BOS
  for (int32_t i = 0; i < n; ++i) {
    const int32_t len = absl::GetFlag(FLAGS_doc_tokens) - 20 + static_cast<int32_t>(doc_rng() % 41);
    s.documents.push_back(tokens(doc_rng, len));
  }
  s.query = tokens(rng, absl::GetFlag(FLAGS_query_tokens));
  s.postamble = tokens(rng, absl::GetFlag(FLAGS_postamble_tokens));
  s.options.mode = mode;
  s.options.top_k = 1;
  s.options.path_cache = cache;
  return s;
}

// FLOP/s of the GEMM the backend's prefill uses (sgemm for float32 weights, the bf16
// kernel for bfloat16) on a prefill-shaped problem: the practical peak.
double GemmRate(bool bf16) {
  const int m = 512, n = 3072, k = 768;
  std::vector<float> a(static_cast<size_t>(m) * k, 0.5f), b(static_cast<size_t>(n) * k, 0.25f),
      c(static_cast<size_t>(m) * n);
  engine::cpu::PackedBf16 packed;
  if (bf16) packed.Pack(b.data(), n, k);
  double best = 1e30;
  for (int r = 0; r < 5; ++r) {
    const double t0 = bench::NowS();
    if (bf16) {
      engine::cpu::Bf16Gemm(a.data(), m, packed, c.data());
    } else {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, a.data(), k, b.data(), k,
                  0.0f, c.data(), n);
    }
    best = std::min(best, bench::NowS() - t0);
  }
  return 2.0 * m * n * k / best;
}

int Main() {
  // Room for 50 documents laid out flat (naive mode).
  auto model =
      bench::GeneratedModel(absl::GetFlag(FLAGS_model), absl::GetFlag(FLAGS_workdir), 16384);
  if (!model.ok()) {
    std::fprintf(stderr, "%s\n", model.status().ToString().c_str());
    return 1;
  }
  engine::BackendOptions bo;
  bo.kv_block_size = 16;
  bo.kv_memory_bytes = int64_t{3} << 30;
  absl::StatusOr<engine::cpu::CpuOptions> cpu =
      engine::cpu::ParseCpuOptions({{"cpu_dtype", absl::GetFlag(FLAGS_cpu_dtype)}});
  if (!cpu.ok()) {
    std::fprintf(stderr, "%s\n", cpu.status().ToString().c_str());
    return 1;
  }
  engine::cpu::CpuBackend backend(bo, *cpu);
  if (absl::Status st = backend.Load(model->config, *model->weights, engine::Shard{}); !st.ok()) {
    std::fprintf(stderr, "%s\n", st.ToString().c_str());
    return 1;
  }
  engine::EngineOptions eo;
  eo.prefix_caching = false;  // naive requests are measured cold, as in the paper
  eo.max_batch_tokens = absl::GetFlag(FLAGS_max_batch_tokens);
  eo.max_running = 64;
  eo.rag_max_documents = 64;
  engine::Engine eng(eo, model->config, model->tokenizer.get(), &backend);
  eng.Start();
  const bool bf16 = backend.compute_dtype() == "bfloat16";
  const double peak = GemmRate(bf16);
  const int32_t vocab = model->config.vocab_size;
  const int32_t reps = absl::GetFlag(FLAGS_reps);
  std::printf("model %s (%.1fM parameters), %s weights, OpenBLAS %s, %d threads, %s %.1f GFLOP/s\n",
              absl::GetFlag(FLAGS_model).c_str(), model->config.NumParameters() / 1e6,
              backend.compute_dtype().c_str(), engine::cpu::BlasCoreName(), omp_get_max_threads(),
              bf16 ? engine::cpu::Bf16GemmKernelName() : "sgemm", peak / 1e9);
  std::printf(
      "documents of %d+-20 tokens, query %d, preamble %d, postamble %d, %d new tokens, "
      "top-k 1, median of %d\n\n",
      absl::GetFlag(FLAGS_doc_tokens), absl::GetFlag(FLAGS_query_tokens),
      absl::GetFlag(FLAGS_preamble_tokens), absl::GetFlag(FLAGS_postamble_tokens),
      absl::GetFlag(FLAGS_new_tokens), reps);
  std::printf(
      "| docs | run | TTFT ms | vs naive | FLOPs total | FLOPs critical path | naive / "
      "critical | GFLOP/s (share of GEMM peak) |\n");
  std::printf("|---:|---|---:|---:|---:|---:|---:|---:|\n");
  uint64_t salt = 1;
  // Warm-up (page in the weights, spin up threads).
  RunOnce(eng, MakeSpec(2, vocab, 999, rag::Mode::kSuperposition, false));
  for (absl::string_view part : absl::StrSplit(absl::GetFlag(FLAGS_docs), ',')) {
    int32_t n = 0;
    if (!absl::SimpleAtoi(part, &n)) continue;
    auto measure = [&](rag::Mode mode, bool cache, bool warm) {
      std::vector<double> ttft;
      Sample last;
      const uint64_t fixed = salt++;
      if (warm) RunOnce(eng, MakeSpec(n, vocab, fixed, mode, true));  // fills the path cache
      for (int32_t r = 0; r < reps; ++r) {
        last = RunOnce(eng, MakeSpec(n, vocab, warm ? fixed : salt++, mode, cache));
        ttft.push_back(last.ttft_s);
      }
      last.ttft_s = bench::Percentile(ttft, 50);
      return last;
    };
    if (absl::GetFlag(FLAGS_warm_only)) {
      const Sample warm = measure(rag::Mode::kSuperposition, true, true);
      std::printf("| %d | warm | %.1f |\n", n, warm.ttft_s * 1e3);
      continue;
    }
    const Sample naive = measure(rag::Mode::kNaive, false, false);
    const Sample cold = measure(rag::Mode::kSuperposition, false, false);
    const Sample warm = measure(rag::Mode::kSuperposition, true, true);
    auto row = [&](const char* name, const Sample& s) {
      // FLOPs up to the first token: all prompt work (the decode steps are the same
      // few tokens in every mode, so the total is reported as the engine counted it).
      std::printf(
          "| %d | %s | %.1f | %.2fx | %.3g | %.3g | %.1fx | %.1f (%.0f%%) |\n", n, name,
          s.ttft_s * 1e3, naive.ttft_s / s.ttft_s, s.result.flops.total,
          s.result.flops.critical_path, naive.result.flops.total / s.result.flops.critical_path,
          s.result.flops.total / s.ttft_s / 1e9, 100.0 * s.result.flops.total / s.ttft_s / peak);
      std::fflush(stdout);
    };
    row("naive", naive);
    row("superposition, cold", cold);
    row("superposition, path cache warm", warm);
  }
  std::printf(
      "\npaper (SP Table 1/5, mpt-7b-instruct, NQ-Open 20 docs, k = 1): theoretical "
      "93.7-94.0x (naive / critical-path compute), measured 6.46x on an A100 "
      "(bloomz 5.64-6.61x)\n");
  eng.Shutdown(absl::ZeroDuration());
  return 0;
}

}  // namespace
}  // namespace superpose

int main(int argc, char** argv) {
  superpose::engine::cpu::EnsureBlasCoreType(argv);
  absl::ParseCommandLine(argc, argv);
  spdlog::set_level(spdlog::level::warn);
  return superpose::Main();
}
