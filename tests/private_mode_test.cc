// Private mode in the engine (EngineOptions::private_mode) on the real stories260k
// model: freed KV blocks read back as zeros (and, as the control, do not without it),
// the prefix and RAG path caches stay cold, and a shutdown refuses queued requests.
#include <gtest/gtest.h>

#include <algorithm>
#include <memory>

#include "engine/cpu/cpu_backend.h"
#include "engine/kv/kv_block_manager.h"
#include "engine/runtime/engine.h"
#include "engine/runtime/model_bundle.h"
#include "tests/forwarding_backend.h"
#include "tests/test_util.h"

namespace superpose {
namespace {

using testing::Collector;
using testing::GreedyRequest;
using testing::RunRequest;

constexpr int32_t kBlocks = 64;

class PrivateModeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto bundle = engine::LoadModelBundle(testing::Stories260kDir());
    ASSERT_TRUE(bundle.ok()) << bundle.status();
    model_ = std::move(*bundle);
  }
  // tp > 1: a tensor-parallel group (each rank zeroes its part).
  std::unique_ptr<engine::Engine> MakeEngine(bool private_mode, int32_t tp = 1,
                                             const std::string& kv_dtype = "float32") {
    engine::BackendOptions opts;
    opts.kv_num_blocks = kBlocks;
    opts.kv_block_size = 16;
    opts.tensor_parallel = tp;
    auto cpu = engine::cpu::ParseCpuOptions({{"kv_cache_dtype", kv_dtype}});
    EXPECT_TRUE(cpu.ok()) << cpu.status();
    backend_ = engine::cpu::MakeCpuBackend(opts, *cpu);
    EXPECT_TRUE(backend_->Load(model_.config, *model_.weights, engine::Shard{}).ok());
    engine::EngineOptions eo;
    eo.private_mode = private_mode;
    auto e =
        std::make_unique<engine::Engine>(eo, model_.config, model_.tokenizer.get(), backend_.get());
    e->Start();
    return e;
  }
  // Blocks of the pool holding any non-zero byte.
  int32_t NonZeroBlocks() {
    int32_t n = 0;
    for (engine::BlockId b = 0; b < kBlocks; ++b) {
      absl::StatusOr<std::vector<uint8_t>> bytes = backend_->KvBlockBytes(b);
      EXPECT_TRUE(bytes.ok()) << bytes.status();
      if (!bytes.ok()) return -1;
      // One rank's block (kv().bytes_per_block) per rank of the group.
      EXPECT_GT(bytes->size(), 0u);
      EXPECT_EQ(static_cast<int64_t>(bytes->size()) % backend_->kv().bytes_per_block, 0);
      n += std::any_of(bytes->begin(), bytes->end(), [](uint8_t c) { return c != 0; });
    }
    return n;
  }
  std::vector<int32_t> Prompt() {
    return model_.tokenizer->Encode(
        "Once upon a time, there was a little girl named Lily. She loved to play outside in "
        "the park with her friends.",
        true);
  }
  engine::Request RagRequest() {
    auto spec = std::make_shared<engine::rag::Spec>();
    spec->preamble = model_.tokenizer->Encode("Read the stories and answer.", true);
    for (const char* d : {"Tom had a big red ball. He liked to play with it every day.",
                          "Lily went to the park with her mom. They saw a big dog."}) {
      spec->documents.push_back(model_.tokenizer->Encode(d, false));
    }
    spec->query = model_.tokenizer->Encode(" What did Tom have?", false);
    spec->options.top_k = 1;
    spec->options.path_cache = true;  // private mode must ignore it
    engine::Request r;
    r.rag = spec;
    r.sampling.temperature = 0.0f;
    r.sampling.max_new_tokens = 6;
    return r;
  }

  engine::ModelBundle model_;
  std::unique_ptr<engine::Backend> backend_;
};

TEST_F(PrivateModeTest, FreedBlocksReadBackAsZeros) {
  auto eng = MakeEngine(/*private_mode=*/true);
  ASSERT_EQ(NonZeroBlocks(), 0);
  const testing::Completion c = RunRequest(*eng, GreedyRequest(Prompt(), 40));
  ASSERT_TRUE(c.status.ok()) << c.status;
  EXPECT_EQ(c.tokens.size(), 40u);
  EXPECT_EQ(eng->stats().kv_blocks_free, kBlocks);
  EXPECT_EQ(NonZeroBlocks(), 0);
  eng->Shutdown(absl::ZeroDuration());
}

// The control: the same request without private mode leaves its keys and values in
// the freed blocks (so the test above can fail).
TEST_F(PrivateModeTest, WithoutPrivateModeFreedBlocksKeepTheirContent) {
  auto eng = MakeEngine(/*private_mode=*/false);
  const testing::Completion c = RunRequest(*eng, GreedyRequest(Prompt(), 40));
  ASSERT_TRUE(c.status.ok()) << c.status;
  EXPECT_EQ(eng->stats().kv_blocks_free, kBlocks);
  EXPECT_GT(NonZeroBlocks(), 0);
  eng->Shutdown(absl::ZeroDuration());
}

TEST_F(PrivateModeTest, Bf16CacheAndTensorParallelGroupAreZeroedToo) {
  auto eng = MakeEngine(/*private_mode=*/true, /*tp=*/2, "bfloat16");
  const testing::Completion c = RunRequest(*eng, GreedyRequest(Prompt(), 24));
  ASSERT_TRUE(c.status.ok()) << c.status;
  EXPECT_EQ(NonZeroBlocks(), 0);
  eng->Shutdown(absl::ZeroDuration());
}

TEST_F(PrivateModeTest, PrefixAndPathCachesStayCold) {
  for (bool private_mode : {false, true}) {
    SCOPED_TRACE(private_mode ? "private" : "control");
    auto eng = MakeEngine(private_mode);
    int32_t cached = 0;
    for (int i = 0; i < 2; ++i) {
      const testing::Completion c = RunRequest(*eng, GreedyRequest(Prompt(), 4));
      ASSERT_TRUE(c.status.ok()) << c.status;
      cached += c.usage.cached_prompt_tokens;
      const testing::Completion r = RunRequest(*eng, RagRequest());
      ASSERT_TRUE(r.status.ok()) << r.status;
      ASSERT_NE(r.rag, nullptr);
      cached += static_cast<int32_t>(r.rag->path_cache_tokens);
    }
    const engine::EngineStats s = eng->stats();
    if (private_mode) {
      EXPECT_EQ(cached, 0);
      EXPECT_EQ(s.path_cache_hits, 0);
      EXPECT_EQ(s.kv_blocks_cached, 0);
      EXPECT_EQ(NonZeroBlocks(), 0);
    } else {
      EXPECT_GT(cached, 0);
      EXPECT_GT(s.path_cache_hits, 0);
    }
    EXPECT_EQ(s.kv_blocks_free, kBlocks);
    eng->Shutdown(absl::ZeroDuration());
  }
}

// Shutdown: a request still queued (never admitted) is refused with UNAVAILABLE at
// once; an admitted one runs until the grace ends and gets a final event with
// finish_reason CANCELLED, an OK status and its usage. Every block is free after.
// A backend whose zeroing fails: the engine fails closed (health, then refusals).
class NoZeroing : public testing::ForwardingBackend {
 public:
  using ForwardingBackend::ForwardingBackend;
  absl::Status ZeroKvBlocks(absl::Span<const engine::BlockId>) override {
    return absl::InternalError("memset failed");
  }
};

TEST_F(PrivateModeTest, FailedZeroingFailsTheEngineClosed) {
  engine::BackendOptions opts;
  opts.kv_num_blocks = kBlocks;
  backend_ = engine::cpu::MakeCpuBackend(opts, {});
  ASSERT_TRUE(backend_->Load(model_.config, *model_.weights, engine::Shard{}).ok());
  NoZeroing failing(backend_.get());
  engine::EngineOptions eo;
  eo.private_mode = true;
  engine::Engine eng(eo, model_.config, model_.tokenizer.get(), &failing);
  eng.Start();
  EXPECT_TRUE(eng.Health().ok());
  ASSERT_TRUE(RunRequest(eng, GreedyRequest(Prompt(), 4)).status.ok());
  EXPECT_EQ(eng.Health().code(), absl::StatusCode::kFailedPrecondition);
  Collector c;
  EXPECT_EQ(eng.Submit(GreedyRequest(Prompt(), 4), c.Callback()).status().code(),
            absl::StatusCode::kUnavailable);
  eng.Shutdown(absl::ZeroDuration());
}

using EngineShutdownTest = PrivateModeTest;

TEST_F(EngineShutdownTest, RefusesQueuedAndCancelsRunningWithUsage) {
  engine::BackendOptions opts;
  opts.kv_num_blocks = kBlocks;
  opts.kv_block_size = 16;
  backend_ = engine::cpu::MakeCpuBackend(opts, {});
  ASSERT_TRUE(backend_->Load(model_.config, *model_.weights, engine::Shard{}).ok());
  engine::EngineOptions eo;
  eo.max_running = 1;
  eo.max_batch_tokens = 1;  // slow: one token per step
  engine::Engine eng(eo, model_.config, model_.tokenizer.get(), backend_.get());
  eng.Start();
  Collector running, queued;
  engine::Request long_req = GreedyRequest(Prompt(), 460);
  long_req.ignore_eos = true;
  ASSERT_TRUE(eng.Submit(long_req, running.Callback()).ok());
  // One token per step: the prompt's steps, then a few generated tokens.
  const int64_t steps = static_cast<int64_t>(long_req.prompt_ids.size()) + 4;
  while (eng.stats().steps < steps) absl::SleepFor(absl::Milliseconds(1));
  ASSERT_TRUE(eng.Submit(long_req, queued.Callback()).ok());
  while (eng.stats().waiting == 0) absl::SleepFor(absl::Milliseconds(1));
  // No grace: the running request is cut now (a grace is no bound here: the whole
  // request takes ~0.1 s on stories260k, so it could finish within one).
  eng.Shutdown(absl::ZeroDuration());
  const testing::Completion& q = queued.Wait();
  EXPECT_EQ(q.status.code(), absl::StatusCode::kUnavailable) << q.status;
  EXPECT_EQ(q.usage.generated_tokens, 0);
  const testing::Completion& r = running.Wait();
  EXPECT_TRUE(r.status.ok()) << r.status;
  EXPECT_EQ(r.finish, engine::FinishReason::kCancelled);
  EXPECT_GT(r.usage.generated_tokens, 0);
  EXPECT_LT(r.usage.generated_tokens, 460);
  EXPECT_EQ(r.usage.prompt_tokens, static_cast<int32_t>(Prompt().size()));
  EXPECT_EQ(eng.stats().kv_blocks_free, kBlocks);
  // After the shutdown new requests are refused.
  Collector late;
  EXPECT_EQ(eng.Submit(long_req, late.Callback()).status().code(), absl::StatusCode::kUnavailable);
}

// The block manager calls the hook once per block, when its last reference goes, and
// forgets the block's cached content first.
TEST(KvReleaseHookTest, CalledAtTheLastReleaseAndUnpublishes) {
  engine::KvBlockManager m(4);
  std::vector<engine::BlockId> freed;
  m.set_release_hook([&](engine::BlockId b) { freed.push_back(b); });
  const engine::BlockId a = *m.Allocate();
  m.Publish(a, 42);
  m.Retain(a);
  m.Release(a);
  EXPECT_TRUE(freed.empty());
  EXPECT_TRUE(m.Contains(42));
  m.Release(a);
  EXPECT_EQ(freed, std::vector<engine::BlockId>{a});
  EXPECT_FALSE(m.Contains(42));
  EXPECT_EQ(m.cached_blocks(), 0);
  EXPECT_EQ(m.free_blocks(), 4);
}

// Private mode's log ids: a keyed hash, the same for one id (lines correlate), different
// for different ids, never the id itself. Process-wide from the call on (ctest runs
// each test in its own process).
TEST(LogIdHashTest, HashedIdsCorrelateAndHideTheId) {
  ASSERT_EQ(engine::LogId::Of("client-id-7")->str(), "client-id-7");
  ASSERT_TRUE(engine::HashRequestIdsInLogs());
  const std::string a = engine::LogId::Of("client-id-7")->str();
  EXPECT_EQ(engine::LogId::Of("client-id-7")->str(), a);
  EXPECT_NE(engine::LogId::Of("client-id-8")->str(), a);
  EXPECT_EQ(a.find("client"), std::string::npos);
  ASSERT_EQ(a.size(), 17u);
  EXPECT_EQ(a[0], 'h');
  EXPECT_EQ(a.find_first_not_of("0123456789abcdef", 1), std::string::npos) << a;
  // Still only ids: text is refused before any hashing.
  EXPECT_FALSE(engine::LogId::Of("tell me a story").ok());
}

}  // namespace
}  // namespace superpose
