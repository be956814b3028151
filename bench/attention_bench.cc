// Where the CPU backend's attention shows: prefill of long prompts (one chunk) and
// decode steps at long contexts, alone and 16 sequences at once, on a generated model.
// The "ctx 0" decode row is the weight-bound baseline measured in the same run; the
// difference to it is the attention's cost.
//
//   build/bench/attention_bench [--model=llama-110m] [--cpu_dtype=auto] [--kv_cache_dtype=auto]
//       [--prefill=128,512,2048] [--contexts=512,2048,4096] [--batch=16] [--steps=8]
#include <omp.h>

#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench/bench_models.h"
#include "bench/bench_util.h"
#include "engine/cpu/blas_setup.h"
#include "engine/cpu/cpu_backend.h"

ABSL_FLAG(std::string, model, "llama-110m", "llama-110m | llama-350m (generated, random bf16)");
ABSL_FLAG(std::string, workdir, "/tmp/superpose-bench", "Where generated models are kept");
ABSL_FLAG(std::string, cpu_dtype, "auto", "CPU weight type: auto | float32 | bfloat16");
ABSL_FLAG(std::string, kv_cache_dtype, "auto", "KV cache type: auto | float32 | bfloat16");
ABSL_FLAG(std::string, prefill, "128,512,2048", "Prompt lengths prefilled as one chunk");
ABSL_FLAG(std::string, contexts, "512,2048,4096", "Context lengths for the decode rows");
ABSL_FLAG(int32_t, batch, 16, "Sequences of the batched decode rows");
ABSL_FLAG(int32_t, steps, 8, "Timed decode steps per row");

namespace {

using namespace superpose;  // NOLINT

constexpr int32_t kBs = 16;

std::vector<int32_t> Ints(const std::string& s) {
  std::vector<int32_t> v;
  for (absl::string_view p : absl::StrSplit(s, ',', absl::SkipEmpty())) {
    int32_t x = 0;
    if (absl::SimpleAtoi(p, &x) && x >= 0) v.push_back(x);
  }
  return v;
}

// Sequence i owns blocks [i * per_seq, (i + 1) * per_seq).
struct Layout {
  int32_t per_seq;
  engine::KvSlot Slot(int32_t seq, int32_t pos) const {
    return {seq * per_seq + pos / kBs, pos % kBs};
  }
  std::vector<engine::KvSegment> Context(int32_t seq, int32_t len) const {
    std::vector<engine::KvSegment> c;
    for (int32_t d = 0; d < len; d += kBs) {
      c.push_back({seq * per_seq + d / kBs, 0, std::min(kBs, len - d)});
    }
    return c;
  }
};

// Prefills tokens [begin, end) of sequence `seq` in one step.
absl::Status Prefill(engine::Backend& b, const Layout& lay, int32_t seq, int32_t begin,
                     int32_t end) {
  engine::BatchPlan p;
  engine::SeqPlan sp;
  sp.id = seq + 1;
  sp.context = lay.Context(seq, begin);
  sp.num_tokens = end - begin;
  for (int32_t i = begin; i < end; ++i) {
    p.tokens.push_back(1 + (i * 7 + seq) % 200);
    p.positions.push_back(static_cast<float>(i));
    p.kv_slots.push_back(lay.Slot(seq, i));
  }
  p.logits_for = {end - begin - 1};
  p.seqs.push_back(sp);
  engine::ForwardOutput out;
  return b.Forward(p, &out);
}

// One decode step of sequences [0, n), each at context `ctx`.
absl::Status DecodeStep(engine::Backend& b, const Layout& lay, int32_t n, int32_t ctx) {
  engine::BatchPlan p;
  for (int32_t s = 0; s < n; ++s) {
    engine::SeqPlan sp;
    sp.id = s + 1;
    sp.context = lay.Context(s, ctx);
    sp.token_begin = s;
    sp.num_tokens = 1;
    p.seqs.push_back(sp);
    p.tokens.push_back(1 + s);
    p.positions.push_back(static_cast<float>(ctx));
    p.kv_slots.push_back(lay.Slot(s, ctx));
    p.logits_for.push_back(s);
  }
  engine::ForwardOutput out;
  return b.Forward(p, &out);
}

}  // namespace

int main(int argc, char** argv) {
  engine::cpu::EnsureBlasCoreType(argv);
  absl::ParseCommandLine(argc, argv);
  auto model = bench::GeneratedModel(absl::GetFlag(FLAGS_model), absl::GetFlag(FLAGS_workdir));
  if (!model.ok()) {
    std::fprintf(stderr, "%s\n", model.status().ToString().c_str());
    return 1;
  }
  const std::vector<int32_t> prefills = Ints(absl::GetFlag(FLAGS_prefill));
  const std::vector<int32_t> contexts = Ints(absl::GetFlag(FLAGS_contexts));
  const int32_t batch = std::max(1, absl::GetFlag(FLAGS_batch));
  const int32_t steps = std::max(1, absl::GetFlag(FLAGS_steps));
  int32_t longest = 1;
  for (int32_t x : prefills) longest = std::max(longest, x);
  for (int32_t x : contexts) longest = std::max(longest, x + steps + 1);
  const Layout lay{(longest + kBs - 1) / kBs + 1};

  engine::BackendOptions opts;
  opts.kv_block_size = kBs;
  opts.kv_num_blocks = lay.per_seq * batch;
  absl::StatusOr<engine::cpu::CpuOptions> cpu =
      engine::cpu::ParseCpuOptions({{"cpu_dtype", absl::GetFlag(FLAGS_cpu_dtype)},
                                    {"kv_cache_dtype", absl::GetFlag(FLAGS_kv_cache_dtype)}});
  if (!cpu.ok()) {
    std::fprintf(stderr, "%s\n", cpu.status().ToString().c_str());
    return 1;
  }
  engine::cpu::CpuBackend backend(opts, *cpu);
  if (auto st = backend.Load(model->config, *model->weights, engine::Shard{}); !st.ok()) {
    std::fprintf(stderr, "load: %s\n", st.ToString().c_str());
    return 1;
  }
  std::printf("model %s, weights %s, KV cache %s, threads %d, head_dim %d, heads %d/%d kv\n\n",
              absl::GetFlag(FLAGS_model).c_str(), backend.compute_dtype().c_str(),
              backend.kv().dtype.c_str(), omp_get_max_threads(), model->config.head_dim,
              model->config.num_heads, model->config.num_kv_heads);
  auto check = [](const absl::Status& st) {
    if (!st.ok()) {
      std::fprintf(stderr, "forward: %s\n", st.ToString().c_str());
      std::exit(1);
    }
  };

  std::printf("| prefill tokens (one chunk) | ms | tok/s |\n|---:|---:|---:|\n");
  check(Prefill(backend, lay, 0, 0, 16));  // warm-up
  for (int32_t n : prefills) {
    double best = 1e30;
    for (int rep = 0; rep < 2; ++rep) {
      const double t0 = bench::NowS();
      check(Prefill(backend, lay, 0, 0, n));
      best = std::min(best, bench::NowS() - t0);
    }
    std::printf("| %d | %.1f | %.0f |\n", n, best * 1e3, n / best);
  }

  // Fill every sequence's cache up to the longest context once (untimed).
  for (int32_t s = 0; s < batch; ++s) {
    for (int32_t b = 0; b < longest; b += 512) {
      check(Prefill(backend, lay, s, b, std::min(longest, b + 512)));
    }
  }
  std::printf("\n| decode context | ms/step, 1 seq | ms/step, %d seqs | tok/s, %d seqs |\n", batch,
              batch);
  std::printf("|---:|---:|---:|---:|\n");
  std::vector<int32_t> ctxs = {0};
  ctxs.insert(ctxs.end(), contexts.begin(), contexts.end());
  for (int32_t ctx : ctxs) {
    double ms[2];
    const int32_t ns[2] = {1, batch};
    for (int k = 0; k < 2; ++k) {
      check(DecodeStep(backend, lay, ns[k], ctx));  // warm-up
      const double t0 = bench::NowS();
      for (int32_t i = 0; i < steps; ++i) check(DecodeStep(backend, lay, ns[k], ctx));
      ms[k] = (bench::NowS() - t0) / steps * 1e3;
    }
    std::printf("| %d | %.2f | %.2f | %.0f |\n", ctx, ms[0], ms[1], batch / ms[1] * 1e3);
  }
  return 0;
}
