// lazy_bench: LazyLLM's time to first token and its quality cost (issue 16).
//
//   build/bench/genmodel --out=/tmp/llama-110m --shape=llama-110m
//   build/bench/lazy_bench --model=/tmp/llama-110m --lengths=1024,2048,4096
//       --keeps=1,0.85,0.7,0.5,0.3 --quality_model=../shared/fixtures/stories260k
//   (one command line)
//
// Speed: one prefill forward of an L-token prompt (best of --reps) without pruning and
// with the paper's boundary layers at each keep fraction of --keeps (the curve; keep 0.7
// is the default schedule). Quality (stories260k at its context length): prompts the
// model writes itself (sampled from BOS, several concatenated: a multi-document prompt),
// first-token KL(baseline || lazy) and greedy agreement (share of positions where the
// lazy run's greedy token equals the baseline's, both free-running and decoded as the
// server decodes: the prefill's decision kept), per keep fraction.
// Never asserted: reported next to each other.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench/bench_util.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/lazy.h"
#include "engine/runtime/lazy_steps.h"
#include "engine/runtime/model_bundle.h"
#include "engine/runtime/step_plan.h"

ABSL_FLAG(std::string, model, "", "Speed model directory (genmodel --shape=llama-110m)");
ABSL_FLAG(std::string, lengths, "1024,2048,4096", "Prompt lengths for the speed curve");
ABSL_FLAG(std::string, keeps, "1,0.85,0.7,0.5,0.3", "Keep fractions (at every boundary)");
ABSL_FLAG(int32_t, reps, 3, "Timed forwards per point (best is reported)");
ABSL_FLAG(int32_t, threads, 0, "Backend threads (0: all cores)");
ABSL_FLAG(std::string, quality_model, "", "Quality model directory (stories260k); empty: skip");
ABSL_FLAG(int32_t, quality_prompts, 8, "Quality prompts");
ABSL_FLAG(int32_t, quality_new_tokens, 32, "Greedy tokens compared per quality prompt");

namespace superpose::bench {
namespace {

using engine::BatchPlan;
using engine::ForwardOutput;

std::vector<float> Floats(const std::string& s) {
  std::vector<float> v;
  for (absl::string_view p : absl::StrSplit(s, ',')) {
    float f;
    if (absl::SimpleAtof(p, &f)) v.push_back(f);
  }
  return v;
}

std::unique_ptr<engine::Backend> Load(const engine::ModelBundle& m, int32_t tokens) {
  engine::BackendOptions o;
  o.num_threads = absl::GetFlag(FLAGS_threads);
  o.kv_num_blocks = tokens / 16 + 16;
  auto b = engine::cpu::MakeCpuBackend(o);
  absl::Status st = b->Load(m.config, *m.weights, engine::Shard{});
  if (!st.ok()) {
    std::fprintf(stderr, "load: %s\n", st.ToString().c_str());
    std::exit(1);
  }
  return b;
}

// A prefill of `tokens` (blocks from 0), pruned with `keep` at `bounds` when given.
BatchPlan Prefill(const std::vector<int32_t>& tokens, const std::vector<int32_t>& bounds,
                  float keep) {
  BatchPlan plan;
  engine::SeqPlan s;
  s.num_tokens = static_cast<int32_t>(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) {
    plan.tokens.push_back(tokens[i]);
    plan.positions.push_back(static_cast<float>(i));
    plan.kv_slots.push_back({static_cast<int32_t>(i / 16), static_cast<int32_t>(i % 16)});
  }
  if (!bounds.empty()) {
    s.lazy.boundaries = bounds;
    s.lazy.stage_context.resize(bounds.size());
    s.lazy.stage_slots.assign(bounds.size(), plan.kv_slots);  // each stage compact from slot 0
    s.lazy.keep.assign(bounds.size(), keep);
  }
  plan.seqs.push_back(s);
  plan.logits_for = {s.num_tokens - 1};
  return plan;
}

double TimeForward(engine::Backend& b, const BatchPlan& plan, int reps) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    ForwardOutput out;
    const double t0 = NowS();
    if (!b.Forward(plan, &out).ok()) std::exit(1);
    best = std::min(best, NowS() - t0);
  }
  return best;
}

void Speed(const std::string& dir) {
  auto m = engine::LoadModelBundle(dir);
  if (!m.ok()) {
    std::fprintf(stderr, "%s\n", m.status().ToString().c_str());
    std::exit(1);
  }
  const std::vector<int32_t> bounds = engine::PaperLazySchedule(m->config.num_layers).boundaries;
  std::printf("speed: %s, %d layers, boundaries after 0-based layers", dir.c_str(),
              m->config.num_layers);
  for (int32_t b : bounds) std::printf(" %d", b);
  std::printf("\n%8s %6s %10s %10s %8s %8s\n", "tokens", "keep", "base_ms", "lazy_ms", "speedup",
              "last%");
  for (float len : Floats(absl::GetFlag(FLAGS_lengths))) {
    const int32_t n = static_cast<int32_t>(len);
    auto b = Load(*m, n);
    std::vector<int32_t> tokens(n);
    for (int32_t i = 0; i < n; ++i) tokens[i] = 258 + (i * 7919) % (m->config.vocab_size - 258);
    const double base = TimeForward(*b, Prefill(tokens, {}, 1.0f), absl::GetFlag(FLAGS_reps));
    for (float keep : Floats(absl::GetFlag(FLAGS_keeps))) {
      const BatchPlan plan = Prefill(tokens, bounds, keep);
      const double t = TimeForward(*b, plan, absl::GetFlag(FLAGS_reps));
      ForwardOutput out;
      if (!b->Forward(plan, &out).ok()) std::exit(1);
      const double last = 100.0 * out.lazy[0].layer_tokens.back() / n;
      std::printf("%8d %6.2f %10.1f %10.1f %7.2fx %7.1f%%\n", n, keep, base * 1e3, t * 1e3,
                  base / t, last);
    }
  }
}

std::vector<float> Softmax(const std::vector<float>& row) {
  const float mx = *std::max_element(row.begin(), row.end());
  double sum = 0;
  for (float v : row) sum += std::exp(static_cast<double>(v - mx));
  std::vector<float> p(row.size());
  for (size_t i = 0; i < row.size(); ++i) p[i] = std::exp(static_cast<double>(row[i] - mx)) / sum;
  return p;
}

// Samples a prompt of `n` tokens from the model itself (temperature 1, fixed seed),
// one decode step per token.
std::vector<int32_t> ModelText(engine::Backend& b, const engine::ModelConfig& c, int32_t n,
                               uint32_t seed) {
  std::vector<int32_t> t = {c.bos_token_id >= 0 ? c.bos_token_id : 1};
  uint64_t state = 0x9E3779B97F4A7C15ull * (seed + 1);
  BatchPlan plan = Prefill(t, {}, 1.0f);
  while (static_cast<int32_t>(t.size()) < n) {
    ForwardOutput out;
    if (!b.Forward(plan, &out).ok()) std::exit(1);
    const std::vector<float> p = Softmax(out.logits);
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    double u = static_cast<double>(state >> 11) / 9007199254740992.0, acc = 0;
    int32_t pick = 0;
    for (; pick + 1 < static_cast<int32_t>(p.size()) && (acc += p[pick]) < u; ++pick) {
    }
    const bool eos =
        std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), pick) != c.eos_token_ids.end();
    const int32_t pos = static_cast<int32_t>(t.size());
    t.push_back(eos ? t[0] : pick);  // documents back to back
    // The next step: the new token after the context of every earlier one.
    plan.seqs[0].context.clear();
    for (int32_t done = 0; done < pos; done += 16) {
      plan.seqs[0].context.push_back({done / 16, 0, std::min(16, pos - done)});
    }
    plan.seqs[0].num_tokens = 1;
    plan.tokens = {t.back()};
    plan.positions = {static_cast<float>(pos)};
    plan.kv_slots = {{pos / 16, pos % 16}};
    plan.logits_for = {0};
  }
  return t;
}

// Greedy continuation as the server runs it (the engine's step planner): one prefill
// that decides (with `bounds`), then decode steps that attend at each layer to the
// prompt tokens with K/V there.
// With `revive`, the decode steps revive (LazyOptions::revive); *revived counts the
// tokens they revived, *decode_ms the decode steps' time.
struct GreedyRun {
  std::vector<int32_t> tokens;
  int64_t revived = 0;
  double decode_ms = 0;
};
GreedyRun Greedy(engine::Backend& b, const engine::ModelConfig& c,
                 const std::vector<int32_t>& prompt, const std::vector<int32_t>& bounds,
                 float keep, int32_t steps, bool revive = false) {
  engine::Sequence seq;
  seq.lazy.revive = revive && !bounds.empty();
  seq.tokens = prompt;
  seq.prompt_len = static_cast<int32_t>(prompt.size());
  seq.emits = true;
  for (int32_t i = 0; i <= (seq.prompt_len + steps) / 16; ++i) seq.blocks.push_back(i);
  if (!bounds.empty()) {
    seq.lazy.boundaries = bounds;
    seq.lazy.keep.assign(bounds.size(), keep);
  }
  const engine::StepPlanOptions opts{16, c.vocab_size, /*compact_logits=*/false, false};
  GreedyRun run;
  std::vector<int32_t>& gen = run.tokens;
  while (static_cast<int32_t>(gen.size()) < steps) {
    const engine::StepPlan sp = engine::BuildStepPlan({{&seq, seq.remaining()}}, opts);
    ForwardOutput out;
    const double t0 = NowS();
    if (!b.Forward(sp.plan, &out).ok()) std::exit(1);
    if (!gen.empty()) run.decode_ms += 1e3 * (NowS() - t0);
    for (const ForwardOutput::Lazy& r : out.lazy) {
      if (seq.lazy.decided()) {
        run.revived += engine::TakeLazyRevival(r, &seq);
      } else {
        engine::TakeLazyDecision(r, &seq);
      }
    }
    seq.computed = static_cast<int32_t>(seq.tokens.size());
    const int32_t next = static_cast<int32_t>(
        std::max_element(out.logits.begin(), out.logits.end()) - out.logits.begin());
    gen.push_back(next);
    seq.tokens.push_back(next);
  }
  b.ReleaseSequence(static_cast<engine::SeqId>(seq.handle));
  return run;
}

void Quality(const std::string& dir) {
  auto m = engine::LoadModelBundle(dir);
  if (!m.ok()) std::exit(1);
  const engine::ModelConfig& c = m->config;
  const int32_t steps = absl::GetFlag(FLAGS_quality_new_tokens);
  const int32_t len = c.max_position_embeddings - steps - 1;
  auto b = Load(*m, c.max_position_embeddings);
  const std::vector<int32_t> bounds = engine::PaperLazySchedule(c.num_layers).boundaries;
  std::printf(
      "quality: %s, %d-token prompts, %d greedy tokens; TTFT mode, then with revival "
      "(revived tokens per decode step, decode ms per token: unpruned / TTFT mode / revival)\n"
      "%6s %12s %10s %10s %8s %8s %8s %8s\n",
      dir.c_str(), len, steps, "keep", "first_KL", "agreement", "revive_agr", "rev/step",
      "tpot_b", "tpot_l", "tpot_r");
  std::vector<std::vector<int32_t>> prompts;
  for (int32_t i = 0; i < absl::GetFlag(FLAGS_quality_prompts); ++i) {
    prompts.push_back(ModelText(*b, c, len, i));
  }
  for (float keep : Floats(absl::GetFlag(FLAGS_keeps))) {
    double kl = 0, agree = 0, agree_r = 0, revived = 0, ms_b = 0, ms_l = 0, ms_r = 0;
    for (const auto& p : prompts) {
      ForwardOutput x, y;
      if (!b->Forward(Prefill(p, {}, 1.0f), &x).ok() ||
          !b->Forward(Prefill(p, bounds, keep), &y).ok()) {
        std::exit(1);
      }
      const std::vector<float> pb = Softmax(x.logits), pl = Softmax(y.logits);
      for (size_t i = 0; i < pb.size(); ++i) {
        if (pb[i] > 0) kl += pb[i] * std::log(pb[i] / std::max(pl[i], 1e-30f));
      }
      const GreedyRun gb = Greedy(*b, c, p, {}, 1.0f, steps);
      const GreedyRun gl = Greedy(*b, c, p, bounds, keep, steps);
      const GreedyRun gr = Greedy(*b, c, p, bounds, keep, steps, /*revive=*/true);
      for (int32_t i = 0; i < steps; ++i) {
        agree += gb.tokens[i] == gl.tokens[i];
        agree_r += gb.tokens[i] == gr.tokens[i];
      }
      revived += static_cast<double>(gr.revived);
      ms_b += gb.decode_ms;
      ms_l += gl.decode_ms;
      ms_r += gr.decode_ms;
    }
    const double np = static_cast<double>(prompts.size()), nd = np * (steps - 1);
    std::printf("%6.2f %12.5f %9.1f%% %9.1f%% %8.1f %8.3f %8.3f %8.3f\n", keep, kl / np,
                100.0 * agree / (np * steps), 100.0 * agree_r / (np * steps), revived / nd,
                ms_b / nd, ms_l / nd, ms_r / nd);
  }
}

}  // namespace
}  // namespace superpose::bench

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  if (!absl::GetFlag(FLAGS_model).empty()) superpose::bench::Speed(absl::GetFlag(FLAGS_model));
  if (!absl::GetFlag(FLAGS_quality_model).empty()) {
    superpose::bench::Quality(absl::GetFlag(FLAGS_quality_model));
  }
  return 0;
}
