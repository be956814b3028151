// Where the CPU backend's attention shows: prefill of long prompts (one chunk) and
// decode steps at long contexts, alone and 16 sequences at once, on a generated model.
// The "ctx 0" decode row is the weight-bound baseline measured in the same run; the
// difference to it is the attention's cost.
// First, the attention kernel alone (engine/cpu/attention.h, one thread, best of 10
// thread-CPU-time samples) on the model's shapes: one layer of a decode token at each
// context, and one layer of a prefill chunk cut into work items the way the backend cuts
// it, float32 and bfloat16 KV.
//
//   build/bench/attention_bench [--model=llama-110m] [--cpu_dtype=auto] [--kv_cache_dtype=auto]
//       [--prefill=128,512,2048] [--contexts=512,2048,4096] [--batch=16] [--steps=8]
//       [--kernel_contexts=128,512,2048] [--kernel_prefill=512] [--model_rows=true]
//       [--simd=auto|avx3|avx2|sse4|...]  (cap the SIMD target, engine/simd.h)
#include <omp.h>

#include <time.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench/bench_models.h"
#include "bench/bench_util.h"
#include "engine/cpu/attention.h"
#include "engine/cpu/blas_setup.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/model/weights.h"
#include "engine/simd.h"

ABSL_FLAG(std::string, model, "llama-110m", "llama-110m | llama-350m (generated, random bf16)");
ABSL_FLAG(std::string, workdir, "/tmp/superpose-bench", "Where generated models are kept");
ABSL_FLAG(std::string, cpu_dtype, "auto", "CPU weight type: auto | float32 | bfloat16");
ABSL_FLAG(std::string, kv_cache_dtype, "auto", "KV cache type: auto | float32 | bfloat16");
ABSL_FLAG(std::string, prefill, "128,512,2048", "Prompt lengths prefilled as one chunk");
ABSL_FLAG(std::string, contexts, "512,2048,4096", "Context lengths for the decode rows");
ABSL_FLAG(int32_t, batch, 16, "Sequences of the batched decode rows");
ABSL_FLAG(int32_t, steps, 8, "Timed decode steps per row");
ABSL_FLAG(std::string, kernel_contexts, "128,512,2048", "Contexts of the kernel decode rows");
ABSL_FLAG(std::string, kernel_prefill, "512", "Chunk lengths of the kernel prefill rows");
ABSL_FLAG(bool, model_rows, true, "Also time prefill and decode of the whole model");
ABSL_FLAG(std::string, simd, "auto", "Highest SIMD target to run: auto or one this CPU has");

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

// This thread's CPU time: the kernel rows run on one thread, and CPU time does not count
// the time other processes take the core from it.
double ThreadCpuS() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + ts.tv_nsec * 1e-9;
}

// One layer's KV pool for the kernel rows: one sequence in blocks 0, 1, ...
struct KernelPool {
  int32_t kvn, D, group;
  bool bf16;
  std::vector<float> k, v;
  std::vector<uint16_t> k16, v16;
  engine::cpu::AttnKeys keys;

  KernelPool(int32_t keys_len, int32_t kv_heads, int32_t head_dim, int32_t grp, bool b16)
      : kvn(kv_heads), D(head_dim), group(grp), bf16(b16) {
    const size_t n = static_cast<size_t>((keys_len + kBs - 1) / kBs) * kBs * kvn * D;
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    k.resize(n);
    v.resize(n);
    for (float& x : k) x = nd(rng);
    for (float& x : v) x = nd(rng);
    for (float x : k) k16.push_back(engine::F32ToBf16(x));
    for (float x : v) v16.push_back(engine::F32ToBf16(x));
    for (int32_t p = 0; p < keys_len; p += kBs)
      keys.Append(p / kBs, 0, std::min(kBs, keys_len - p), kBs);
  }
  engine::cpu::KvLayerView View() const {
    if (bf16) return {k16.data(), v16.data(), kvn, D, kBs, true};
    return {k.data(), v.data(), kvn, D, kBs, false};
  }
};

// One layer of attention for `rows` new tokens after `ctx` cached ones: per kv head,
// work items of up to 32 / group rows x group heads (as CpuBackend::BuildKeyIndex cuts
// them). Returns the best seconds per layer.
double TimeKernelLayer(const KernelPool& pool, int32_t ctx, int32_t rows) {
  const int32_t D = pool.D, g = pool.group, tile = std::max(1, 32 / g);
  std::vector<float> q(static_cast<size_t>(rows) * g * D), out(q.size());
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (float& x : q) x = nd(rng);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  engine::cpu::AttnScratch scratch;
  std::vector<const float*> qs;
  std::vector<float*> os;
  std::vector<int32_t> nks;
  auto layer = [&] {
    for (int32_t kvh = 0; kvh < pool.kvn; ++kvh) {
      for (int32_t r0 = 0; r0 < rows; r0 += tile) {
        qs.clear();
        os.clear();
        nks.clear();
        for (int32_t r = r0; r < std::min(rows, r0 + tile); ++r) {
          for (int32_t h = 0; h < g; ++h) {
            qs.push_back(&q[(static_cast<size_t>(r) * g + h) * D]);
            os.push_back(&out[(static_cast<size_t>(r) * g + h) * D]);
            nks.push_back(ctx + r + 1);
          }
        }
        engine::cpu::Attend(pool.View(), kvh, pool.keys, static_cast<int32_t>(qs.size()), qs.data(),
                            nks.data(), scale, os.data(), &scratch);
      }
    }
  };
  layer();  // warm-up
  double best = 1e30;
  for (int rep = 0; rep < 10; ++rep) {
    int32_t iters = 0;
    const double t0 = ThreadCpuS();
    double t = 0;
    do {
      layer();
      ++iters;
      t = ThreadCpuS() - t0;
    } while (t < 0.02);
    best = std::min(best, t / iters);
  }
  return best;
}

// Multiply-adds of one layer's attention (q.k and p.v), as flops.
double LayerFlops(const KernelPool& pool, int32_t ctx, int32_t rows) {
  double keys = 0;
  for (int32_t r = 0; r < rows; ++r) keys += ctx + r + 1;
  return keys * pool.kvn * pool.group * pool.D * 4.0;
}

void KernelRows(const engine::ModelConfig& cfg) {
  const std::vector<int32_t> contexts = Ints(absl::GetFlag(FLAGS_kernel_contexts));
  const std::vector<int32_t> chunks = Ints(absl::GetFlag(FLAGS_kernel_prefill));
  int32_t longest = 1;
  for (int32_t c : contexts) longest = std::max(longest, c + 1);
  for (int32_t c : chunks) longest = std::max(longest, c);
  const int32_t group = cfg.num_heads / cfg.num_kv_heads;
  std::printf(
      "attention kernel alone, one thread (CPU time), one layer (%d kv heads x %d queries, D "
      "%d)\n\n",
      cfg.num_kv_heads, group, cfg.head_dim);
  std::printf("| KV | shape | us / layer | GFLOP/s |\n|---|---|---:|---:|\n");
  for (bool bf16 : {false, true}) {
    const KernelPool pool(longest, cfg.num_kv_heads, cfg.head_dim, group, bf16);
    const char* kv = bf16 ? "bf16" : "f32";
    for (int32_t c : contexts) {
      const double t = TimeKernelLayer(pool, c, 1);
      std::printf("| %s | decode, context %d | %.1f | %.1f |\n", kv, c, t * 1e6,
                  LayerFlops(pool, c, 1) / t * 1e-9);
    }
    for (int32_t n : chunks) {
      const double t = TimeKernelLayer(pool, 0, n);
      std::printf("| %s | prefill chunk %d | %.1f | %.1f |\n", kv, n, t * 1e6,
                  LayerFlops(pool, 0, n) / t * 1e-9);
    }
  }
  std::printf("\n");
}

}  // namespace

int main(int argc, char** argv) {
  engine::cpu::EnsureBlasCoreType(argv);
  absl::ParseCommandLine(argc, argv);
  if (absl::Status st = engine::simd::LimitTargets(absl::GetFlag(FLAGS_simd)); !st.ok()) {
    std::fprintf(stderr, "--simd: %s\n", st.ToString().c_str());
    return 1;
  }
  // The target the attention kernel dispatches to.
  std::printf("SIMD target %s on %s\n", engine::cpu::AttnKernelName().c_str(),
              bench::CpuModel().c_str());
  auto model = bench::GeneratedModel(absl::GetFlag(FLAGS_model), absl::GetFlag(FLAGS_workdir));
  if (!model.ok()) {
    std::fprintf(stderr, "%s\n", model.status().ToString().c_str());
    return 1;
  }
  KernelRows(model->config);
  if (!absl::GetFlag(FLAGS_model_rows)) return 0;
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
