// The scheduler as data: snapshots in, decisions out (engine/runtime/scheduler.h).
#include "engine/runtime/scheduler.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace superpose::engine {
namespace {

constexpr int32_t kBs = 16;

// A running sequence that has computed `computed` of `total` tokens and holds exactly
// the blocks for them (all its own unless `exclusive` says otherwise).
SeqSnapshot Running(int32_t computed, int32_t total, int32_t exclusive = -1) {
  SeqSnapshot s;
  s.computed = computed;
  s.total = total;
  s.held_blocks = (computed + kBs - 1) / kBs;
  s.exclusive_blocks = exclusive < 0 ? s.held_blocks : exclusive;
  return s;
}
SeqSnapshot Waiting(int32_t total, int32_t prefix = 0, int32_t unreferenced = 0) {
  SeqSnapshot s;
  s.total = total;
  s.prefix_blocks = prefix;
  s.prefix_unreferenced = unreferenced;
  return s;
}

// A decision written compactly: "r0:1 w0:100" (running/waiting index : tokens).
std::string Scheduled(const Decision& d) {
  std::string out;
  for (const auto& s : d.scheduled) {
    if (!out.empty()) out += " ";
    out += (s.seq.waiting ? "w" : "r") + std::to_string(s.seq.index) + ":" +
           std::to_string(s.num_tokens);
  }
  return out;
}
std::string Indices(const std::vector<int32_t>& v) {
  std::string out;
  for (int32_t i : v) out += (out.empty() ? "r" : " r") + std::to_string(i);
  return out;
}
std::string Failed(const Decision& d) {
  std::string out;
  for (const auto& f : d.failed) {
    if (!out.empty()) out += " ";
    out += (f.seq.waiting ? "w" : "r") + std::to_string(f.seq.index);
  }
  return out;
}

struct Case {
  std::string name;
  Snapshot snap;
  SchedulerLimits limits;
  std::string scheduled;
  std::string preempted;
  std::string failed;
};

TEST(SchedulerTest, Table) {
  const SchedulerLimits base{512, 64, kBs};
  const std::vector<Case> cases = {
      {"a long prompt is chunked by the budget",
       {{}, {Waiting(1000)}, 100},
       base,
       "w0:512",
       "",
       ""},
      {"the next prompt gets what the first left",
       {{}, {Waiting(300), Waiting(300)}, 100},
       base,
       "w0:300 w1:212",
       "",
       ""},
      {"running sequences decode first, then prefill fills the budget",
       {{Running(16, 17), Running(31, 32), Running(8, 9)}, {Waiting(600)}, 100},
       base,
       "r0:1 r1:1 r2:1 w0:509",
       "",
       ""},
      {"a running prefill continues with its next chunk",
       {{Running(512, 1000)}, {Waiting(10)}, 100},
       base,
       "r0:488 w0:10",
       "",
       ""},
      {"budget 1: only the oldest running sequence",
       {{Running(16, 17), Running(16, 17)}, {Waiting(5)}, 100},
       {1, 64, kBs},
       "r0:1",
       "",
       ""},
      {"the batch size bounds admission",
       {{Running(4, 5)}, {Waiting(5), Waiting(5), Waiting(5)}, 100},
       {512, 3, kBs},
       "r0:1 w0:5 w1:5",
       "",
       ""},
      {"out of blocks: the newest running sequence is preempted",
       // Each needs a new block at 32 tokens; one block is free; r2 holds 2 of its own.
       {{Running(32, 33), Running(32, 33), Running(32, 33)}, {}, 1},
       base,
       "r0:1 r1:1",
       "r2",
       ""},
      {"preemption repeats until the oldest fits",
       {{Running(32, 33), Running(16, 17), Running(16, 17)}, {}, 0},
       base,
       "r0:1",
       "r2 r1",
       ""},
      {"a victim's shared blocks free nothing",
       {{Running(32, 33), Running(32, 33, 0)}, {}, 0},
       base,
       "",
       "r1",
       "r0 r1"},
      {"a sequence alone that cannot fit fails", {{Running(32, 33)}, {}, 0}, base, "", "", "r0"},
      {"a prompt that can never fit fails; the next one runs",
       {{}, {Waiting(1000), Waiting(20)}, 10},
       base,
       "w1:20",
       "",
       "w0"},
      {"FCFS: a prompt that does not fit now waits, and so does everything behind it",
       {{Running(16, 17)}, {Waiting(200), Waiting(5)}, 5},
       base,
       "r0:1",
       "",
       ""},
      {"a prefix-cache match needs fewer new blocks",
       // 40 tokens = 3 blocks; 2 come from the cache (referenced by someone): 1 new.
       {{}, {Waiting(40, 2, 0)}, 1},
       base,
       "w0:8",
       "",
       ""},
      {"matched unreferenced blocks leave the free pool",
       {{}, {Waiting(40, 2, 2)}, 2},
       base,
       "",
       "",
       "w0"},
      {"preempted sequences wait ahead of the queue and may be admitted again",
       // r1, mid-prefill, frees 4 blocks; with 10 tokens of budget left it needs only 1.
       {{Running(16, 17), Running(64, 100)}, {Waiting(5)}, 0},
       {11, 64, kBs},
       "r0:1 r1:10",
       "r1",
       ""},
  };
  for (const Case& c : cases) {
    const Decision d = Schedule(c.snap, c.limits);
    EXPECT_EQ(Scheduled(d), c.scheduled) << c.name;
    EXPECT_EQ(Indices(d.preempted), c.preempted) << c.name;
    EXPECT_EQ(Failed(d), c.failed) << c.name;
    // Budget: what is placed plus what is left is the step's budget (a victim is never
    // placed before it is preempted: placement goes oldest first, preemption newest
    // first, so no budget is lost to it).
    int32_t used = 0;
    for (const auto& s : d.scheduled) used += s.num_tokens;
    EXPECT_EQ(used + d.budget_left, c.limits.max_batch_tokens) << c.name;
  }
}

TEST(SchedulerTest, FailuresSayWhatCannotFit) {
  const SchedulerLimits limits{512, 64, kBs};
  Decision d = Schedule({{Running(32, 33)}, {}, 0}, limits);
  ASSERT_EQ(d.failed.size(), 1u);
  EXPECT_EQ(d.failed[0].status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(d.failed[0].status.message(), "the KV cache cannot hold this sequence");
  d = Schedule({{}, {Waiting(1000)}, 3}, limits);
  ASSERT_EQ(d.failed.size(), 1u);
  EXPECT_EQ(d.failed[0].status.message(), "the KV cache cannot hold this prompt");
}

TEST(SchedulerTest, StorageGapCostsAFreshBlock) {
  // A RAG path: 20 document tokens, then the query on a fresh block. 20 + 4 tokens
  // need 3 blocks (16 + 4 | 4), not 2.
  SeqSnapshot s = Waiting(24);
  s.gap_at = 20;
  EXPECT_EQ(Scheduled(Schedule({{}, {s}, 3}, {512, 64, kBs})), "w0:24");
  EXPECT_EQ(Failed(Schedule({{}, {s}, 2}, {512, 64, kBs})), "w0");
}

TEST(SchedulerTest, PriorityOrder) {
  struct P {
    std::vector<int32_t> queue;
    int32_t priority;
    int32_t index;
  };
  const std::vector<P> cases = {
      {{}, 0, 0},        {{0, 0}, 0, 2},  // FCFS within a priority
      {{5, 0}, 1, 1},    {{5, 0}, 9, 0},  // ahead of lower priorities
      {{5, 5, 0}, 5, 2}, {{0, 0}, -3, 2},
  };
  for (const P& c : cases) {
    EXPECT_EQ(PriorityInsertIndex(c.queue, c.priority), c.index);
  }
}

TEST(SchedulerTest, WaitingQueueBound) {
  const absl::Status ok = absl::OkStatus();
  EXPECT_TRUE(CheckQueue(true, ok, 0, 1).ok());
  EXPECT_TRUE(CheckQueue(true, ok, 255, 256).ok());
  EXPECT_EQ(CheckQueue(true, ok, 256, 256).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(CheckQueue(false, ok, 0, 256).code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(CheckQueue(true, absl::AbortedError("rank 1 failed"), 0, 256).code(),
            absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace superpose::engine
