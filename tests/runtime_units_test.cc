// Unit tests of the runtime pieces: sampler, stop strings, KV block manager.
#include <gtest/gtest.h>

#include <map>

#include "engine/kv/kv_block_manager.h"
#include "engine/runtime/sampler.h"
#include "engine/runtime/stop_checker.h"

namespace superpose::engine {
namespace {

TEST(SamplerTest, GreedyPicksArgmaxLowestIdOnTies) {
  SamplingOptions o;
  o.temperature = 0;
  Sampler s(o, {});
  std::vector<float> logits = {0.1f, 3.0f, -1.0f, 3.0f};
  EXPECT_EQ(s.Sample(absl::MakeSpan(logits)), 1);
}

TEST(SamplerTest, SameSeedSameTokensDifferentSeedDiffers) {
  std::vector<float> base(64);
  for (int i = 0; i < 64; ++i) base[i] = static_cast<float>((i * 37) % 11) * 0.3f;
  auto draw = [&](uint64_t seed) {
    SamplingOptions o;
    o.temperature = 1.0f;
    o.seed = seed;
    Sampler s(o, {});
    std::vector<int32_t> out;
    for (int i = 0; i < 50; ++i) {
      std::vector<float> l = base;
      out.push_back(s.Sample(absl::MakeSpan(l)));
    }
    return out;
  };
  EXPECT_EQ(draw(7), draw(7));
  EXPECT_NE(draw(7), draw(8));
}

TEST(SamplerTest, TopKAndTopPRestrictTheSupport) {
  std::vector<float> base = {5.0f, 4.0f, 1.0f, 0.5f, 0.0f, -1.0f};
  SamplingOptions o;
  o.temperature = 1.0f;
  o.top_k = 2;
  o.seed = 1;
  Sampler s(o, {});
  std::map<int32_t, int> seen;
  for (int i = 0; i < 500; ++i) {
    std::vector<float> l = base;
    ++seen[s.Sample(absl::MakeSpan(l))];
  }
  EXPECT_EQ(seen.size(), 2u);
  EXPECT_GT(seen[0], seen[1]);

  SamplingOptions p;
  p.temperature = 1.0f;
  p.top_p = 0.5f;  // token 0 alone has probability ~0.72
  p.seed = 2;
  Sampler sp(p, {});
  for (int i = 0; i < 200; ++i) {
    std::vector<float> l = base;
    EXPECT_EQ(sp.Sample(absl::MakeSpan(l)), 0);
  }
}

TEST(SamplerTest, MinPDropsUnlikelyTokens) {
  std::vector<float> base = {2.0f, 1.9f, -5.0f, -6.0f};
  SamplingOptions o;
  o.temperature = 1.0f;
  o.min_p = 0.2f;
  o.seed = 3;
  Sampler s(o, {});
  for (int i = 0; i < 300; ++i) {
    std::vector<float> l = base;
    EXPECT_LT(s.Sample(absl::MakeSpan(l)), 2);
  }
}

TEST(SamplerTest, PenaltiesChangeTheGreedyChoice) {
  SamplingOptions o;
  o.temperature = 0;
  o.repetition_penalty = 2.0f;
  std::vector<int32_t> prompt = {0};
  Sampler s(o, prompt);
  std::vector<float> l = {3.0f, 2.0f};  // 3/2 = 1.5 < 2
  EXPECT_EQ(s.Sample(absl::MakeSpan(l)), 1);

  SamplingOptions f;
  f.temperature = 0;
  f.frequency_penalty = 1.0f;
  Sampler sf(f, {});
  sf.Accept(0);
  sf.Accept(0);
  std::vector<float> l2 = {3.0f, 1.5f};  // 3 - 2 = 1 < 1.5
  EXPECT_EQ(sf.Sample(absl::MakeSpan(l2)), 1);
}

TEST(LogprobsTest, MatchLogSoftmax) {
  std::vector<float> l = {1.0f, 2.0f, 3.0f};
  TokenLogprobs lp = ComputeLogprobs(l, 0, 2);
  const double lse = std::log(std::exp(1.0) + std::exp(2.0) + std::exp(3.0));
  EXPECT_NEAR(lp.chosen.logprob, 1.0 - lse, 1e-6);
  ASSERT_EQ(lp.top.size(), 2u);
  EXPECT_EQ(lp.top[0].token_id, 2);
  EXPECT_EQ(lp.top[1].token_id, 1);
}

// Log lines print a request only through LogId: an id, never text.
TEST(LogIdTest, OnlyIdsBecomeLogIds) {
  absl::StatusOr<LogId> ok = LogId::Of("req-7:a.b_C");
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(ok->str(), "req-7:a.b_C");
  EXPECT_EQ(LogId::Of("tell me a story").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LogId::Of("line\nbreak").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LogId::Of(std::string(129, 'a')).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(LogId::Of("").ok());
  EXPECT_EQ(LogId().str(), "");
}

TEST(StopCheckerTest, HoldsBackPrefixesAndCutsAtTheStop) {
  StopChecker c({"END", "\n\n"});
  bool stopped = false;
  EXPECT_EQ(c.Append("Hello E", &stopped), "Hello ");
  EXPECT_FALSE(stopped);
  EXPECT_EQ(c.Append("N", &stopped), "");
  EXPECT_EQ(c.Append("Dless", &stopped), "");
  EXPECT_TRUE(stopped);
}

TEST(StopCheckerTest, FalseAlarmIsReleased) {
  StopChecker c({"END"});
  bool stopped = false;
  EXPECT_EQ(c.Append("EN", &stopped), "");
  EXPECT_EQ(c.Append("x", &stopped), "ENx");
  EXPECT_EQ(c.Append("E", &stopped), "");
  EXPECT_EQ(c.Flush(), "E");
}

TEST(StopCheckerTest, StopSplitAcrossManyDeltas) {
  StopChecker c({"<|end|>"});
  bool stopped = false;
  std::string out;
  for (char ch : std::string("abc<|end|>def")) {
    out += c.Append(std::string(1, ch), &stopped);
    if (stopped) break;
  }
  EXPECT_TRUE(stopped);
  EXPECT_EQ(out, "abc");
}

TEST(KvBlockManagerTest, RefcountsAndFreeCount) {
  KvBlockManager m(4);
  auto a = m.Allocate();
  auto b = m.Allocate();
  ASSERT_TRUE(a && b);
  EXPECT_EQ(m.free_blocks(), 2);
  m.Retain(*a);
  m.Release(*a);
  EXPECT_EQ(m.free_blocks(), 2);
  m.Release(*a);
  m.Release(*b);
  EXPECT_EQ(m.free_blocks(), 4);
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(m.Allocate());
  EXPECT_FALSE(m.Allocate());
}

TEST(KvBlockManagerTest, PrefixCacheHitAndLruEviction) {
  KvBlockManager m(3);
  auto a = m.Allocate();
  auto b = m.Allocate();
  m.Publish(*a, 111);
  m.Publish(*b, 222);
  m.Release(*a);  // a is older in LRU order than b
  m.Release(*b);
  EXPECT_EQ(m.free_blocks(), 3);
  EXPECT_EQ(m.cached_blocks(), 2);
  auto hit = m.Lookup(222);
  ASSERT_TRUE(hit);
  EXPECT_EQ(*hit, *b);
  EXPECT_EQ(m.refcount(*b), 1);
  // Allocation takes the never-used block first, then evicts the LRU cached one (a).
  auto c = m.Allocate();
  auto d = m.Allocate();
  ASSERT_TRUE(c && d);
  EXPECT_EQ(*d, *a);
  EXPECT_FALSE(m.Lookup(111));
  EXPECT_EQ(m.evictions(), 1);
  EXPECT_FALSE(m.Allocate());
}

}  // namespace
}  // namespace superpose::engine
