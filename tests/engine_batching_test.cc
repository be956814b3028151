// Continuous batching on the real stories260k model: batched greedy outputs equal solo
// outputs (with preemption and prefix-cache hits), no KV block leaks, backpressure.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <thread>

#include "absl/strings/str_join.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/runtime/engine.h"
#include "engine/runtime/model_bundle.h"
#include "tests/forwarding_backend.h"
#include "tests/test_util.h"

namespace superpose {
namespace {

using testing::Collector;
using testing::GreedyRequest;
using testing::RunRequest;

// The sanitizer builds run these stress tests at a smaller scale (they were the slowest
// tests there, ~3 min under ASan and again under TSan): the same properties, with
// fewer streams and shorter generations; the Release build runs the full scale.
#if defined(SP_SANITIZER_BUILD)
constexpr int kStreams = 12, kStressBlocks = 18, kLeakTokens = 60, kQueueTokens = 100;
#else
constexpr int kStreams = 32, kStressBlocks = 48, kLeakTokens = 200, kQueueTokens = 300;
#endif

class BatchingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto bundle = engine::LoadModelBundle(testing::Stories260kDir());
    ASSERT_TRUE(bundle.ok()) << bundle.status();
    model_ = std::move(*bundle);
  }
  std::unique_ptr<engine::Engine> MakeEngine(int32_t blocks, engine::EngineOptions eo = {}) {
    engine::BackendOptions opts;
    opts.kv_num_blocks = blocks;
    opts.kv_block_size = 16;
    auto cpu = engine::cpu::ParseCpuOptions({{"cpu_dtype", dtype_}});
    EXPECT_TRUE(cpu.ok()) << cpu.status();
    backends_.push_back(std::make_unique<engine::cpu::CpuBackend>(opts, *cpu));
    EXPECT_TRUE(backends_.back()->Load(model_.config, *model_.weights, engine::Shard{}).ok());
    auto e = std::make_unique<engine::Engine>(eo, model_.config, model_.tokenizer.get(),
                                              backends_.back().get());
    e->Start();
    return e;
  }
  // Mixed prompts: story openings of varied length, some sharing long prefixes.
  std::vector<std::vector<int32_t>> Prompts(int n) {
    const std::vector<std::string> seeds = {
        "Once upon a time", "One day, a little girl named Lily went to the park with her mom.",
        "Tom had a big red ball", "The sun was shining and the birds were singing in the trees.",
        "Sam and his dog"};
    std::vector<std::vector<int32_t>> out;
    for (int i = 0; i < n; ++i) {
      std::string text = seeds[i % seeds.size()];
      for (int k = 0; k < i % 3; ++k) text += " She was very happy and she smiled.";
      out.push_back(model_.tokenizer->Encode(text, true));
    }
    return out;
  }
  // stress: a pool too small for all (preemption + recompute) and prefix caching on.
  void ExpectConcurrentGreedyEqualsSolo(bool stress);
  engine::ModelBundle model_;
  std::string dtype_ = "auto";
  std::vector<std::unique_ptr<engine::Backend>> backends_;
};

void BatchingTest::ExpectConcurrentGreedyEqualsSolo(bool stress) {
  const auto prompts = Prompts(kStreams);
  std::vector<std::vector<int32_t>> solo;
  {
    auto eng = MakeEngine(256, engine::EngineOptions{.prefix_caching = false});
    for (size_t i = 0; i < prompts.size(); ++i) {
      auto r = RunRequest(*eng, GreedyRequest(prompts[i], 24 + static_cast<int32_t>(i % 4) * 8));
      ASSERT_TRUE(r.status.ok());
      solo.push_back(r.tokens);
    }
  }
  // Stress: a pool too small for all at once forces preemption; prefix caching is on.
  // Otherwise every prompt is prefilled as one chunk, as when alone.
  engine::EngineOptions eo;
  eo.max_batch_tokens = stress ? 128 : 4096;
  eo.max_running = 32;
  eo.prefix_caching = stress;
  auto eng = MakeEngine(stress ? kStressBlocks : 512, eo);
  const int32_t free0 = eng->blocks().free_blocks();
  std::vector<Collector> cs(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(eng->Submit(GreedyRequest(prompts[i], 24 + static_cast<int32_t>(i % 4) * 8),
                            cs[i].Callback())
                    .ok());
  }
  int cached = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const auto& r = cs[i].Wait();
    ASSERT_TRUE(r.status.ok()) << i << ": " << r.status;
    EXPECT_EQ(r.tokens, solo[i]) << "request " << i;
    cached += r.usage.cached_prompt_tokens > 0;
  }
  if (stress) {
    EXPECT_GT(eng->stats().preemptions, 0) << "the test should exercise preemption";
    EXPECT_GT(cached, 0) << "the test should exercise the prefix cache";
  }
  eng->Shutdown(absl::Seconds(1));
  EXPECT_EQ(eng->blocks().free_blocks(), free0);
}

TEST_F(BatchingTest, ConcurrentGreedyEqualsSolo) { ExpectConcurrentGreedyEqualsSolo(true); }

// bf16 weights (AMX tiles where present): every GEMM output element and every token's
// attention output are computed the same way whatever the batch, the chunking or the
// cache state, so 32 concurrent streams under preemption (recompute) and prefix-cache
// hits stay token-for-token equal to solo runs: bitwise invariance, not luck.
TEST_F(BatchingTest, ConcurrentGreedyEqualsSoloWithBf16Weights) {
  dtype_ = "bfloat16";
  ExpectConcurrentGreedyEqualsSolo(true);
  EXPECT_EQ(backends_.back()->compute_dtype(), "bfloat16");
}

// The engine itself refuses an id that is not an id (it is written into log lines), for
// every caller, not only the gRPC server.
TEST_F(BatchingTest, TextAsRequestIdIsRejectedBySubmit) {
  auto eng = MakeEngine(16);
  engine::Request req = GreedyRequest(Prompts(1)[0], 4);
  req.request_id = "my secret prompt";
  Collector c;
  auto h = eng->Submit(req, c.Callback());
  EXPECT_EQ(h.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(h.status().message()).find("request_id"), std::string::npos);
  req.request_id = std::string(129, 'a');
  EXPECT_EQ(eng->Submit(req, c.Callback()).status().code(), absl::StatusCode::kInvalidArgument);
  req.request_id = "req-1_a.b:c";
  ASSERT_TRUE(eng->Submit(req, c.Callback()).ok());
  EXPECT_TRUE(c.Wait().status.ok());
  eng->Shutdown(absl::Seconds(1));
}

TEST_F(BatchingTest, SharedThreeBlockPrefixIsCached) {
  std::vector<int32_t> prefix = model_.tokenizer->Encode(
      "Once upon a time, there was a little girl named Lily. She loved to play outside in "
      "the park with her friends. One day, she saw a big red ball under a tree. She ran to "
      "get it and showed it to her mom.",
      true);
  ASSERT_GE(prefix.size(), 48u);
  prefix.resize(48);  // exactly three blocks of 16
  std::vector<int32_t> a = prefix, b = prefix;
  for (int32_t t : model_.tokenizer->Encode(" The dog ran", false)) a.push_back(t);
  for (int32_t t : model_.tokenizer->Encode(" One day", false)) b.push_back(t);
  std::vector<int32_t> uncached_b;
  {
    auto eng = MakeEngine(64, engine::EngineOptions{.prefix_caching = false});
    uncached_b = RunRequest(*eng, GreedyRequest(b, 20)).tokens;
  }
  auto eng = MakeEngine(64);
  auto ra = RunRequest(*eng, GreedyRequest(a, 20));
  EXPECT_EQ(ra.usage.cached_prompt_tokens, 0);
  auto rb = RunRequest(*eng, GreedyRequest(b, 20));
  ASSERT_TRUE(rb.status.ok());
  EXPECT_EQ(rb.usage.cached_prompt_tokens, 48);
  EXPECT_EQ(rb.tokens, uncached_b);
  // Another tenant never sees these blocks.
  auto other = GreedyRequest(b, 20);
  other.tenant = "other";
  auto ro = RunRequest(*eng, other);
  EXPECT_EQ(ro.usage.cached_prompt_tokens, 0);
  EXPECT_EQ(ro.tokens, uncached_b);
}

TEST_F(BatchingTest, NoBlockLeakAfterCancelsDeadlinesAndErrors) {
  auto eng = MakeEngine(24);  // 384 slots: the 500-token prompt below can never fit
  const int32_t free0 = eng->blocks().free_blocks();
  const auto prompts = Prompts(12);
  std::vector<Collector> cs(prompts.size());
  std::vector<uint64_t> handles;
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto req = GreedyRequest(prompts[i], kLeakTokens);
    if (i % 3 == 1) req.deadline = absl::Now() + absl::Milliseconds(20);
    auto h = eng->Submit(std::move(req), cs[i].Callback());
    ASSERT_TRUE(h.ok());
    handles.push_back(*h);
  }
  absl::SleepFor(absl::Milliseconds(5));
  for (size_t i = 0; i < prompts.size(); i += 3) eng->Cancel(handles[i]);
  // An error: a prompt larger than the whole pool.
  Collector big;
  auto too_big = GreedyRequest(std::vector<int32_t>(500, 300), 5);
  ASSERT_TRUE(eng->Submit(std::move(too_big), big.Callback()).ok());
  int cancelled = 0, expired = 0, finished = 0;
  for (auto& c : cs) {
    const auto& r = c.Wait();
    if (r.status.code() == absl::StatusCode::kCancelled) ++cancelled;
    if (r.status.code() == absl::StatusCode::kDeadlineExceeded) ++expired;
    if (r.status.ok()) ++finished;
  }
  EXPECT_EQ(big.Wait().status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_GT(cancelled, 0);
  EXPECT_GT(expired, 0);
  EXPECT_GT(finished, 0);
  // Every block is free again (cached ones are free, just findable). The gauges are
  // refreshed by the engine loop after the last callback: wait for it to go idle.
  for (int i = 0; i < 500 && (eng->stats().running != 0 || eng->stats().waiting != 0); ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_EQ(eng->blocks().free_blocks(), free0);
  EXPECT_EQ(eng->stats().running, 0);
  EXPECT_EQ(eng->stats().waiting, 0);
}

TEST_F(BatchingTest, FullQueueIsRejectedAtOnceWhileStreamsContinue) {
  engine::EngineOptions eo;
  eo.max_running = 2;
  eo.max_waiting = 2;
  auto eng = MakeEngine(64, eo);
  const auto prompts = Prompts(4);
  std::vector<Collector> cs(4);
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(eng->Submit(GreedyRequest(prompts[i], kQueueTokens), cs[i].Callback()).ok()) << i;
    if (i == 1) {  // let the first two start running (however loaded the machine is)
      for (int k = 0; k < 2000 && eng->stats().running < 2; ++k) {
        absl::SleepFor(absl::Milliseconds(5));
      }
      ASSERT_EQ(eng->stats().running, 2);
    }
  }
  // Rejected by Submit itself (no wall-clock bound asserted): the status comes back from
  // the call and the callback never runs.
  int extra_events = 0;
  auto h =
      eng->Submit(GreedyRequest(prompts[0], 8), [&](engine::StreamEvent&&) { ++extra_events; });
  EXPECT_EQ(h.status().code(), absl::StatusCode::kResourceExhausted);
  for (auto& c : cs) EXPECT_TRUE(c.Wait().status.ok());
  EXPECT_EQ(cs[0].Wait().tokens.size(), static_cast<size_t>(kQueueTokens));
  EXPECT_EQ(extra_events, 0);
}

// The CPU backend, slowed to at least 1 ms a step: a running request holds the batch for
// a known minimum time however fast the machine is.
class SlowBackend : public testing::ForwardingBackend {
 public:
  using ForwardingBackend::ForwardingBackend;
  absl::Status Forward(const engine::BatchPlan& plan, engine::ForwardOutput* out) override {
    absl::SleepFor(absl::Milliseconds(1));
    return inner()->Forward(plan, out);
  }
};

class TenantTest : public BatchingTest {
 protected:
  // One sequence runs at a time, each step at least 1 ms.
  std::unique_ptr<engine::Engine> MakeSlowEngine(engine::EngineOptions eo,
                                                 engine::TenantPolicies policies = {}) {
    engine::BackendOptions opts;
    opts.kv_num_blocks = 64;
    backends_.push_back(std::make_unique<engine::cpu::CpuBackend>(opts));
    EXPECT_TRUE(backends_.back()->Load(model_.config, *model_.weights, engine::Shard{}).ok());
    backends_.push_back(std::make_unique<SlowBackend>(backends_.back().get()));
    eo.max_running = 1;
    auto e = std::make_unique<engine::Engine>(eo, model_.config, model_.tokenizer.get(),
                                              backends_.back().get());
    e->SetTenantPolicies(std::move(policies));
    e->Start();
    return e;
  }
  engine::Request Req(const std::string& tenant, int32_t priority, int32_t max_new_tokens) {
    engine::Request r = GreedyRequest(Prompts(1)[0], max_new_tokens);
    r.tenant = tenant;
    r.priority = priority;
    return r;
  }
  // Waits until the engine runs a sequence and holds no waiting one.
  void AwaitRunning(engine::Engine& eng) {
    for (int k = 0; k < 2000 && eng.stats().running < 1; ++k) absl::SleepFor(absl::Milliseconds(2));
    ASSERT_EQ(eng.stats().running, 1);
  }
};

// A request not admitted within max_queue_ms is refused with RESOURCE_EXHAUSTED and a
// retry hint; the running one is unaffected and every block comes back.
TEST_F(TenantTest, MaxQueueMsRefusesWhatWaitsTooLong) {
  engine::EngineOptions eo;
  eo.max_queue_ms = 30;
  auto eng = MakeSlowEngine(eo);
  const int32_t free0 = eng->blocks().free_blocks();
  Collector running, queued;
  ASSERT_TRUE(eng->Submit(Req("a", 0, 120), running.Callback()).ok());  // >= 120 ms
  AwaitRunning(*eng);
  ASSERT_TRUE(eng->Submit(Req("b", 0, 4), queued.Callback()).ok());
  const auto& q = queued.Wait();
  EXPECT_EQ(q.status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(q.status.message().find("30 ms"), absl::string_view::npos) << q.status;
  EXPECT_EQ(engine::RetryAfterMs(q.status), 30);
  EXPECT_TRUE(q.tokens.empty());
  EXPECT_GE(q.usage.queue_time_ms, 30);
  const auto& r = running.Wait();
  ASSERT_TRUE(r.status.ok()) << r.status;
  EXPECT_EQ(r.tokens.size(), 120u);
  for (int i = 0; i < 500 && (eng->stats().running != 0 || eng->stats().waiting != 0); ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_EQ(eng->stats().waiting, 0);
  EXPECT_EQ(eng->blocks().free_blocks(), free0);
  // Off by default: a request may wait as long as it takes.
  auto patient = MakeSlowEngine(engine::EngineOptions{});
  Collector first, second;
  ASSERT_TRUE(patient->Submit(Req("a", 0, 60), first.Callback()).ok());
  ASSERT_TRUE(patient->Submit(Req("b", 0, 4), second.Callback()).ok());
  EXPECT_TRUE(second.Wait().status.ok());
}

// A tenant's queue bound refuses its flood, naming the limit, while another tenant
// still gets in; the other tenant's request is admitted at its fair share (second),
// although the flood has a higher priority; the tenant's tokens in flight are bounded.
TEST_F(TenantTest, TenantBoundsAndFairShare) {
  engine::TenantPolicies p;
  p.tenants["a"].max_queued = 4;
  p.tenants["a"].max_prompt_tokens = 100;
  auto eng = MakeSlowEngine(engine::EngineOptions{}, p);
  absl::Mutex mu;
  std::vector<std::string> order;
  auto tracked = [&](const std::string& name, Collector& c) {
    return [&, name, cb = c.Callback()](engine::StreamEvent&& ev) {
      if (ev.finished) {
        absl::MutexLock lock(&mu);
        order.push_back(name);
      }
      cb(std::move(ev));
    };
  };
  std::vector<Collector> a(5);
  ASSERT_TRUE(eng->Submit(Req("a", 0, 40), tracked("a0", a[0])).ok());
  AwaitRunning(*eng);
  for (int i = 1; i < 5; ++i) {
    ASSERT_TRUE(eng->Submit(Req("a", 100, 10), tracked("a" + std::to_string(i), a[i])).ok());
  }
  auto refused = eng->Submit(Req("a", 100, 10), nullptr);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(refused.status().message().find("tenant 'a'"), absl::string_view::npos);
  EXPECT_NE(refused.status().message().find("max_queued is 4"), absl::string_view::npos);
  EXPECT_TRUE(engine::RetryAfterMs(refused.status()).has_value());
  Collector b;
  ASSERT_TRUE(eng->Submit(Req("b", 0, 10), tracked("b", b)).ok());
  ASSERT_TRUE(b.Wait().status.ok());
  for (auto& c : a) ASSERT_TRUE(c.Wait().status.ok());
  {
    absl::MutexLock lock(&mu);
    ASSERT_EQ(order.size(), 6u);
    // a0 ran first; then a's first queued request and b tie on the clock (a's was
    // earlier), after which b's clock is behind: b is second or third, never last.
    const int b_at = static_cast<int>(std::find(order.begin(), order.end(), "b") - order.begin());
    EXPECT_LE(b_at, 2) << absl::StrJoin(order, " ");
  }
  // max_prompt_tokens: a prompt larger than the tenant's bound is refused.
  engine::Request big = Req("a", 0, 4);
  big.prompt_ids.assign(101, 300);
  auto too_many = eng->Submit(std::move(big), nullptr);
  EXPECT_EQ(too_many.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(too_many.status().message().find("max_prompt_tokens (100)"), absl::string_view::npos)
      << too_many.status();
  EXPECT_FALSE(engine::RetryAfterMs(too_many.status()).has_value());  // it can never pass
  // Policies are replaced at run time (a reload of the key file).
  engine::Request small = Req("a", 0, 2);
  ASSERT_TRUE(RunRequest(*eng, small).status.ok());
  p.tenants["a"].max_prompt_tokens = static_cast<int64_t>(small.prompt_ids.size()) - 1;
  eng->SetTenantPolicies(p);
  EXPECT_EQ(RunRequest(*eng, small).status.code(), absl::StatusCode::kResourceExhausted);
  p.tenants.clear();
  eng->SetTenantPolicies(p);
  EXPECT_TRUE(RunRequest(*eng, small).status.ok());
}

// A request's priority is capped to its tenant's max_priority: a capped "urgent"
// request waits behind the tenant's earlier one.
TEST_F(TenantTest, PriorityIsCappedToTheTenantsMaxPriority) {
  for (const bool capped : {false, true}) {
    engine::TenantPolicies p;
    if (capped) p.tenants["a"].max_priority = 0;
    auto eng = MakeSlowEngine(engine::EngineOptions{}, p);
    absl::Mutex mu;
    std::vector<int> order;
    std::vector<Collector> cs(3);
    auto cb = [&](int i) {
      return [&, i, inner = cs[i].Callback()](engine::StreamEvent&& ev) {
        if (ev.finished) {
          absl::MutexLock lock(&mu);
          order.push_back(i);
        }
        inner(std::move(ev));
      };
    };
    ASSERT_TRUE(eng->Submit(Req("a", 0, 100), cb(0)).ok());
    AwaitRunning(*eng);
    ASSERT_TRUE(eng->Submit(Req("a", 0, 4), cb(1)).ok());
    ASSERT_TRUE(eng->Submit(Req("a", 100, 4), cb(2)).ok());
    for (auto& c : cs) ASSERT_TRUE(c.Wait().status.ok());
    absl::MutexLock lock(&mu);
    EXPECT_EQ(order, (capped ? std::vector<int>{0, 1, 2} : std::vector<int>{0, 2, 1}));
  }
}

// Counts the compact rows the engine asks for, around the CPU backend.
class CountingBackend : public testing::ForwardingBackend {
 public:
  using ForwardingBackend::ForwardingBackend;
  absl::Status Forward(const engine::BatchPlan& plan, engine::ForwardOutput* out) override {
    for (int32_t n : plan.logits_top) (n > 0 ? compact : whole) += 1;
    if (plan.logits_top.empty()) whole += static_cast<int64_t>(plan.logits_for.size());
    return inner()->Forward(plan, out);
  }
  int64_t compact = 0, whole = 0;
};

// Compact logits rows (the backend returns a row's best tokens and its log-sum-exp)
// give the same tokens and log-probabilities as whole rows, bitwise, for greedy and
// top-k requests; requests that need the whole row (top-p without top-k, penalties)
// still get it.
TEST_F(BatchingTest, CompactLogitsRowsSampleLikeWholeRows) {
  const auto prompts = Prompts(6);
  auto request = [&](int i) {
    engine::Request r = GreedyRequest(prompts[i], 20);
    r.sampling.seed = 100 + i;
    r.logprobs = true;
    switch (i) {
      case 0:  // greedy, 5 alternatives
        r.top_logprobs = 5;
        break;
      case 1:
        r.sampling.temperature = 0.9f;
        r.sampling.top_k = 20;
        r.top_logprobs = 3;
        break;
      case 2:
        r.sampling.temperature = 0.8f;
        r.sampling.top_k = 40;
        r.sampling.top_p = 0.9f;
        r.sampling.min_p = 0.05f;
        break;
      case 3:  // whole rows: top-p without top-k
        r.sampling.temperature = 1.0f;
        r.sampling.top_p = 0.9f;
        break;
      case 4:  // whole rows: a penalty
        r.sampling.repetition_penalty = 1.3f;
        break;
      default:
        r.sampling.temperature = 1.5f;
        r.sampling.top_k = 64;
        r.top_logprobs = 64;
        break;
    }
    return r;
  };
  std::vector<testing::Completion> results[2];
  int64_t compact[2], whole[2];
  for (int mode = 0; mode < 2; ++mode) {
    engine::BackendOptions opts;
    opts.kv_num_blocks = 64;
    auto cpu = std::make_unique<engine::cpu::CpuBackend>(opts);
    ASSERT_TRUE(cpu->Load(model_.config, *model_.weights, engine::Shard{}).ok());
    CountingBackend counting(cpu.get());
    engine::EngineOptions eo;
    eo.compact_logits = mode == 1;
    engine::Engine eng(eo, model_.config, model_.tokenizer.get(), &counting);
    eng.Start();
    for (int i = 0; i < 6; ++i) {  // one at a time: the same steps in both modes
      results[mode].push_back(RunRequest(eng, request(i)));
      ASSERT_TRUE(results[mode].back().status.ok()) << i;
    }
    eng.Shutdown(absl::Seconds(1));
    compact[mode] = counting.compact;
    whole[mode] = counting.whole;
  }
  EXPECT_EQ(compact[0], 0);
  EXPECT_EQ(compact[1], 4 * 20);  // requests 0, 1, 2 and 5, one row per token
  EXPECT_EQ(whole[1], 2 * 20);
  for (int i = 0; i < 6; ++i) {
    const testing::Completion& a = results[0][i];
    const testing::Completion& b = results[1][i];
    EXPECT_EQ(a.tokens, b.tokens) << "request " << i;
    ASSERT_EQ(a.logprobs.size(), b.logprobs.size()) << i;
    for (size_t t = 0; t < a.logprobs.size(); ++t) {
      EXPECT_EQ(a.logprobs[t].chosen.token_id, b.logprobs[t].chosen.token_id);
      EXPECT_EQ(a.logprobs[t].chosen.logprob, b.logprobs[t].chosen.logprob) << i << " " << t;
      ASSERT_EQ(a.logprobs[t].top.size(), b.logprobs[t].top.size());
      for (size_t k = 0; k < a.logprobs[t].top.size(); ++k) {
        EXPECT_EQ(a.logprobs[t].top[k].token_id, b.logprobs[t].top[k].token_id);
        EXPECT_EQ(a.logprobs[t].top[k].logprob, b.logprobs[t].top[k].logprob);
      }
    }
  }
  // Request 5 really sampled: some of its tokens are not the most likely one.
  int not_best = 0;
  for (const engine::TokenLogprobs& lp : results[1][5].logprobs) {
    not_best += lp.chosen.token_id != lp.top[0].token_id;
  }
  EXPECT_GT(not_best, 0);
}

// Records what the engine asks a row-sampling backend and what it returns.
class SamplingSpy : public testing::ForwardingBackend {
 public:
  using ForwardingBackend::ForwardingBackend;
  absl::Status Forward(const engine::BatchPlan& plan, engine::ForwardOutput* out) override {
    absl::Status st = inner()->Forward(plan, out);
    if (!st.ok()) return st;
    size_t k = 0;
    for (size_t r = 0; r < plan.sampling.size(); ++r) {
      if (plan.sampling[r].temperature <= 0.0f) {
        ++other_rows;
        continue;
      }
      draws[plan.sampling[r].seed].push_back({plan.sampling[r].draw, out->sampled[k++]});
    }
    return st;
  }
  // seed -> (draw index, token) in step order.
  std::map<uint64_t, std::vector<std::pair<int64_t, int32_t>>> draws;
  int64_t other_rows = 0;
};

// Temperature requests without top-k or penalties are drawn by a backend that samples
// rows (here the CPU backend with cpu_row_sampling, the GPU's algorithm on the host):
// the engine passes each request's seed and the index of the token as the draw, streams
// the backend's tokens, reports their log-probabilities, and the same seed gives the
// same tokens; greedy and penalised requests still sample on the host.
TEST_F(BatchingTest, BackendRowSamplingThroughTheEngine) {
  const auto prompts = Prompts(4);
  auto run = [&](uint64_t seed_base, SamplingSpy** spy_out,
                 std::vector<std::unique_ptr<engine::Backend>>* keep) {
    engine::BackendOptions opts;
    opts.kv_num_blocks = 64;
    engine::cpu::CpuOptions cpu;
    cpu.row_sampling = true;
    keep->push_back(std::make_unique<engine::cpu::CpuBackend>(opts, cpu));
    EXPECT_TRUE(keep->back()->Load(model_.config, *model_.weights, engine::Shard{}).ok());
    auto spy = std::make_unique<SamplingSpy>(keep->back().get());
    *spy_out = spy.get();
    engine::Engine eng(engine::EngineOptions{}, model_.config, model_.tokenizer.get(), spy.get());
    eng.Start();
    std::vector<Collector> cs(4);
    for (int i = 0; i < 4; ++i) {
      engine::Request r = GreedyRequest(prompts[i], 16);
      r.sampling.seed = seed_base + i;
      if (i == 0) {
        r.sampling.temperature = 0.9f;
        r.sampling.top_p = 0.9f;
        r.logprobs = true;
        r.top_logprobs = 3;
      } else if (i == 1) {
        r.sampling.temperature = 1.2f;
        r.sampling.min_p = 0.05f;
      } else if (i == 3) {
        r.sampling.temperature = 1.0f;
        r.sampling.repetition_penalty = 1.2f;  // host sampler
      }
      EXPECT_TRUE(eng.Submit(std::move(r), cs[i].Callback()).ok());
    }
    std::vector<testing::Completion> out;
    for (auto& c : cs) out.push_back(c.Wait());
    eng.Shutdown(absl::Seconds(1));
    keep->push_back(std::move(spy));
    return out;
  };
  std::vector<std::unique_ptr<engine::Backend>> keep;
  SamplingSpy* spy = nullptr;
  const auto a = run(100, &spy, &keep);
  for (const auto& c : a) ASSERT_TRUE(c.status.ok()) << c.status;
  // Requests 0 and 1 were drawn by the backend, draw after draw, and streamed as drawn.
  for (int i = 0; i < 2; ++i) {
    const auto& d = spy->draws[100 + i];
    ASSERT_EQ(d.size(), 16u) << i;
    for (size_t t = 0; t < d.size(); ++t) {
      EXPECT_EQ(d[t].first, static_cast<int64_t>(t));
      EXPECT_EQ(d[t].second, a[i].tokens[t]) << i << " " << t;
    }
  }
  EXPECT_EQ(spy->draws.count(102), 0u);  // greedy
  EXPECT_EQ(spy->draws.count(103), 0u);  // a penalty
  EXPECT_GE(spy->other_rows, 2 * 16);
  // Log-probabilities of the drawn tokens: the chosen one's, and 3 alternatives.
  ASSERT_EQ(a[0].logprobs.size(), 16u);
  for (const engine::TokenLogprobs& lp : a[0].logprobs) {
    EXPECT_LE(lp.chosen.logprob, 0.0f);
    ASSERT_EQ(lp.top.size(), 3u);
    EXPECT_GE(lp.top[0].logprob, lp.chosen.logprob);
    for (const auto& t : lp.top) {
      if (t.token_id == lp.chosen.token_id) {
        EXPECT_FLOAT_EQ(t.logprob, lp.chosen.logprob);
      }
    }
  }
  // Same seeds, same tokens; other seeds, other tokens.
  SamplingSpy* spy2 = nullptr;
  const auto b = run(100, &spy2, &keep);
  SamplingSpy* spy3 = nullptr;
  const auto c = run(200, &spy3, &keep);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(a[i].tokens, b[i].tokens) << i;
  EXPECT_NE(a[0].tokens, c[0].tokens);
  EXPECT_NE(a[1].tokens, c[1].tokens);

  // More top log-probabilities than a compact row holds: the host samples the whole row.
  engine::BackendOptions opts;
  opts.kv_num_blocks = 16;
  engine::cpu::CpuOptions sampling;
  sampling.row_sampling = true;
  engine::cpu::CpuBackend cpu(opts, sampling);
  ASSERT_TRUE(cpu.Load(model_.config, *model_.weights, engine::Shard{}).ok());
  SamplingSpy wide(&cpu);
  engine::Engine eng(engine::EngineOptions{}, model_.config, model_.tokenizer.get(), &wide);
  eng.Start();
  engine::Request r = GreedyRequest(prompts[0], 4);
  r.sampling.temperature = 1.0f;
  r.sampling.seed = 5;
  r.logprobs = true;
  r.top_logprobs = engine::kMaxTopLogits + 16;
  const auto w = testing::RunRequest(eng, std::move(r));
  ASSERT_TRUE(w.status.ok()) << w.status;
  ASSERT_EQ(w.logprobs.size(), 4u);
  EXPECT_EQ(w.logprobs[0].top.size(), static_cast<size_t>(engine::kMaxTopLogits + 16));
  EXPECT_TRUE(wide.draws.empty());
  eng.Shutdown(absl::Seconds(1));
}

}  // namespace
}  // namespace superpose
