// The scheduling decision of one engine step, as a pure function of a snapshot: which
// sequences run (with how many new tokens), which running ones are preempted, which
// can never run. The engine applies the decision afterwards (engine.cc); nothing here
// touches engine state, so every rule is tested as data (tests/scheduler_test.cc).
//
// Rules (vLLM-style continuous batching with chunked prefill):
//  1. Running sequences, oldest first, each get min(remaining, budget) tokens (one
//     decode token, or the next prefill chunk) while the token budget lasts.
//  2. When a running sequence's blocks do not fit, the newest running sequence is
//     preempted (possibly the one being placed): its blocks go back, it goes to the
//     front of the waiting queue. (Placement goes oldest first, preemption newest
//     first: a victim was never placed this step, so no budget is lost to it.) A
//     sequence alone in the batch that does not fit the pool can never run: it fails.
//  3. Waiting sequences are admitted while the budget, the batch size and the blocks
//     last. Preempted ones (and any admitted before) go first, in queue order. Then the
//     tenants take turns by weighted fair share: the next sequence is the head of the
//     waiting tenant whose clock (prompt tokens admitted / weight) is lowest, ties to
//     the earliest head; the queue is kept in priority order, FCFS within a priority
//     (PriorityInsertIndex), so priority orders requests only within a tenant. A tenant
//     at its max_running is passed over this step. The first sequence that does not fit
//     stops admission (so a large prompt is not starved), unless nothing is running:
//     then it can never fit and fails.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace superpose::engine {

struct SchedulerLimits {
  int32_t max_batch_tokens = 512;  // new tokens per step
  int32_t max_running = 64;        // sequences in the running batch
  int32_t block_size = 16;
};

// What the scheduler sees of one sequence.
struct SeqSnapshot {
  int32_t computed = 0;  // tokens whose K/V are held
  int32_t total = 0;     // tokens it has (prompt and generated)
  int32_t gap_at = -1;   // storage gap (sequence.h StorageIndex)
  int32_t held_blocks = 0;
  // Of the held blocks, those nobody else references: freed when it is preempted.
  int32_t exclusive_blocks = 0;
  // Waiting sequences: full blocks a prefix-cache match would give it now, and how
  // many of those are unreferenced (they leave the free pool when matched).
  int32_t prefix_blocks = 0;
  int32_t prefix_unreferenced = 0;
  int32_t tenant = 0;    // index into Snapshot::tenants
  bool started = false;  // waiting, but admitted before (preempted): goes first, uncharged
  // Its next step must take every remaining token (a LazyLLM prefill that decides): when
  // the budget left is smaller, admission stops (as when its blocks do not fit).
  bool whole = false;
};

// A tenant with running or waiting sequences.
struct TenantShare {
  double service = 0;       // its fair-share clock: prompt tokens admitted / weight
  int32_t weight = 1;       // >= 1
  int32_t max_running = 0;  // its sequences in the running batch; 0: no bound
};

struct Snapshot {
  std::vector<SeqSnapshot> running;       // oldest first
  std::vector<SeqSnapshot> waiting;       // queue order
  int32_t free_blocks = 0;                // unreferenced blocks (free or evictable)
  std::vector<TenantShare> tenants = {};  // empty: one tenant, no bound
};

// Which sequence: running[index] or waiting[index] of the snapshot.
struct SeqRef {
  bool waiting = false;
  int32_t index = 0;
  bool operator==(const SeqRef& o) const { return waiting == o.waiting && index == o.index; }
};

struct Decision {
  struct Scheduled {
    SeqRef seq;
    int32_t num_tokens = 0;
    int32_t prefix_blocks = 0;  // admitted: the prefix match to take first
  };
  // In plan order: running sequences, then admitted ones.
  std::vector<Scheduled> scheduled;
  // Running sequences preempted, in order (each goes to the front of the waiting
  // queue, so the last one preempted ends up first).
  std::vector<int32_t> preempted;
  // Sequences that can never fit the KV pool, in the order found.
  struct Failed {
    SeqRef seq;
    absl::Status status;
  };
  std::vector<Failed> failed;
  int32_t budget_left = 0;
  // The tenants' clocks once this step's admissions are charged (as Snapshot::tenants).
  std::vector<double> service;
};

Decision Schedule(const Snapshot& snapshot, const SchedulerLimits& limits);

// Where a request of `priority` joins a waiting queue whose priorities are given in
// queue order: after every entry of the same or a higher priority.
int32_t PriorityInsertIndex(absl::Span<const int32_t> waiting_priorities, int32_t priority);

// Whether one more request may queue: UNAVAILABLE while not accepting (shutting down)
// or while the backend is unhealthy, RESOURCE_EXHAUSTED when `queued` requests already
// wait and the bound is `max_waiting`.
absl::Status CheckQueue(bool accepting, const absl::Status& backend_health, int32_t queued,
                        int32_t max_waiting);

}  // namespace superpose::engine
