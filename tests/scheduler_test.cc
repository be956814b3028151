// The scheduler as data: snapshots in, decisions out (engine/runtime/scheduler.h).
#include "engine/runtime/scheduler.h"
#include "engine/runtime/tenant_policy.h"

#include <algorithm>
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

SeqSnapshot Of(int32_t tenant, int32_t total) {
  SeqSnapshot s = Waiting(total);
  s.tenant = tenant;
  return s;
}

// Tenant 0 floods the queue with high-priority requests (they queue ahead of everything
// by priority); tenant 1's one request is still admitted at its fair share: second.
TEST(SchedulerTest, AFloodOfHighPriorityRequestsDoesNotStarveAnotherTenant) {
  Snapshot snap;
  snap.free_blocks = 1000;
  for (int i = 0; i < 6; ++i) snap.waiting.push_back(Of(0, 100));  // priority 100
  snap.waiting.push_back(Of(1, 100));                              // priority 0
  snap.tenants = {{0, 1, 0}, {0, 1, 0}};
  const Decision d = Schedule(snap, {512, 3, kBs});
  EXPECT_EQ(Scheduled(d), "w0:100 w6:100 w1:100");
  ASSERT_EQ(d.service.size(), 2u);
  EXPECT_EQ(d.service[0], 200);
  EXPECT_EQ(d.service[1], 100);
  // Without tenants (one implicit tenant): queue order, as before.
  snap.tenants.clear();
  for (auto& w : snap.waiting) w.tenant = 0;
  EXPECT_EQ(Scheduled(Schedule(snap, {512, 3, kBs})), "w0:100 w1:100 w2:100");
}

// Steps of a saturated server: each step admits `per_step` sequences of `tokens`
// prompt tokens from two tenants that always have work; returns who got admitted.
std::string Simulate(std::vector<TenantShare> tenants, std::vector<int32_t> tokens, int per_step,
                     int steps) {
  std::string who;
  for (int step = 0; step < steps; ++step) {
    Snapshot snap;
    snap.free_blocks = 10000;
    snap.tenants = tenants;
    for (int i = 0; i < 8; ++i) {
      for (int32_t t = 0; t < static_cast<int32_t>(tenants.size()); ++t) {
        snap.waiting.push_back(Of(t, tokens[t]));
      }
    }
    const Decision d = Schedule(snap, {100000, per_step, kBs});
    for (const auto& s : d.scheduled)
      who += static_cast<char>('a' + snap.waiting[s.seq.index].tenant);
    for (size_t t = 0; t < tenants.size(); ++t) tenants[t].service = d.service[t];
  }
  return who;
}

TEST(SchedulerTest, TenantsShareAdmittedPromptTokensByWeight) {
  // Equal weights, equal prompts: they alternate.
  EXPECT_EQ(Simulate({{0, 1, 0}, {0, 1, 0}}, {100, 100}, 1, 8), "abababab");
  // Weight 3 to 1: three admissions of a for one of b.
  const std::string w = Simulate({{0, 3, 0}, {0, 1, 0}}, {100, 100}, 2, 8);
  EXPECT_EQ(std::count(w.begin(), w.end(), 'a'), 12) << w;
  // The share is of tokens: b's prompts are 4x longer, so a gets 4 requests for b's 1.
  const std::string t = Simulate({{0, 1, 0}, {0, 1, 0}}, {50, 200}, 1, 10);
  EXPECT_EQ(std::count(t.begin(), t.end(), 'a'), 8) << t;
}

// The queue is in priority order (PriorityInsertIndex), so a tenant's high-priority
// request runs before its own earlier ones, but not before another tenant's turn.
TEST(SchedulerTest, PriorityOrdersRequestsWithinATenant) {
  std::vector<int32_t> priorities;
  std::vector<SeqSnapshot> queue;
  auto add = [&](int32_t tenant, int32_t priority, int32_t total) {
    const int32_t at = PriorityInsertIndex(priorities, priority);
    priorities.insert(priorities.begin() + at, priority);
    queue.insert(queue.begin() + at, Of(tenant, total));
  };
  add(0, 0, 10);   // a's first request
  add(1, 0, 11);   // b's
  add(0, 50, 12);  // a's urgent one: ahead of a's first
  Snapshot snap{{}, queue, 100};
  snap.tenants = {{0, 1, 0}, {0, 1, 0}};
  EXPECT_EQ(Scheduled(Schedule(snap, {512, 3, kBs})), "w0:12 w2:11 w1:10");
}

TEST(SchedulerTest, TenantRunningBound) {
  // Tenant 0 runs one sequence and may run only one: its waiting ones are passed over,
  // tenant 1's is admitted.
  Snapshot snap{{Running(16, 17)}, {Of(0, 20), Of(0, 20), Of(1, 20)}, 100};
  snap.tenants = {{0, 1, 1}, {50, 1, 0}};
  EXPECT_EQ(Scheduled(Schedule(snap, {512, 64, kBs})), "r0:1 w2:20");
  snap.tenants[0].max_running = 2;
  EXPECT_EQ(Scheduled(Schedule(snap, {512, 64, kBs})), "r0:1 w0:20 w2:20");
}

TEST(SchedulerTest, PreemptedSequencesGoFirstUncharged) {
  // w1 (tenant 1) was admitted before and preempted: it goes ahead of tenant 0's turn and
  // costs tenant 1 nothing.
  Snapshot snap{{}, {Of(0, 20), Of(1, 20)}, 100};
  snap.waiting[1].started = true;
  snap.tenants = {{0, 1, 0}, {0, 1, 0}};
  const Decision d = Schedule(snap, {512, 64, kBs});
  EXPECT_EQ(Scheduled(d), "w1:20 w0:20");
  EXPECT_EQ(d.service[1], 0);
  EXPECT_EQ(d.service[0], 20);
}

TEST(SchedulerTest, TenantLimitsOnSubmit) {
  TenantPolicies p;
  p.tenants["a"].max_queued = 2;
  p.tenants["a"].max_prompt_tokens = 100;
  p.default_max_queued = 5;
  auto check = [&](const std::string& tenant, int32_t queued, int64_t in_flight, int64_t tokens) {
    return CheckTenant(tenant, p, queued, in_flight, tokens, 250);
  };
  EXPECT_TRUE(check("a", 1, 0, 10).ok());
  const absl::Status q = check("a", 2, 0, 10);
  EXPECT_EQ(q.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(q.message().find("tenant 'a'"), absl::string_view::npos) << q;
  EXPECT_NE(q.message().find("max_queued is 2"), absl::string_view::npos) << q;
  EXPECT_EQ(RetryAfterMs(q), 250);
  const absl::Status t = check("a", 0, 95, 10);
  EXPECT_EQ(t.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(t.message().find("max_prompt_tokens (100)"), absl::string_view::npos) << t;
  EXPECT_EQ(RetryAfterMs(t), 250);
  EXPECT_TRUE(check("a", 0, 90, 10).ok());
  // A prompt that can never pass: refused without a retry hint.
  const absl::Status never = check("a", 0, 0, 101);
  EXPECT_EQ(never.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(never.message().find("101 prompt tokens exceed"), absl::string_view::npos) << never;
  EXPECT_FALSE(RetryAfterMs(never).has_value());
  // Another tenant gets the default bound.
  EXPECT_TRUE(check("b", 4, 1000, 1000).ok());
  EXPECT_EQ(check("b", 5, 0, 1).code(), absl::StatusCode::kResourceExhausted);
  p.default_max_queued = 0;
  EXPECT_TRUE(check("b", 500, 0, 1).ok());
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
