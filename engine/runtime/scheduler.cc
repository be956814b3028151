#include "engine/runtime/scheduler.h"

#include <algorithm>
#include <deque>

#include "absl/strings/str_cat.h"
#include "engine/sequence/sequence.h"

namespace superpose::engine {
namespace {

// The decision being built, with the pool as it will be once applied.
class Planner {
 public:
  Planner(const Snapshot& s, const SchedulerLimits& limits)
      : snap_(s), limits_(limits), free_(s.free_blocks), budget_(limits.max_batch_tokens) {
    for (int32_t i = 0; i < static_cast<int32_t>(s.running.size()); ++i) running_.push_back(i);
    alloc_.assign(s.running.size(), 0);
  }

  Decision Run() {
    PlaceRunning();
    Admit();
    d_.budget_left = budget_;
    if (!snap_.tenants.empty()) {
      for (const TenantShare& t : tenants_) d_.service.push_back(t.service);
    }
    return std::move(d_);
  }

 private:
  // New blocks `s` needs to hold `tokens` tokens.
  int32_t Need(const SeqSnapshot& s, int32_t held, int32_t tokens) const {
    return std::max(0, BlocksFor(s.gap_at, limits_.block_size, tokens) - held);
  }

  void PlaceRunning() {
    for (size_t i = 0; i < running_.size() && budget_ > 0;) {
      const int32_t r = running_[i];
      const SeqSnapshot& s = snap_.running[r];
      const int32_t n = std::min(s.total - s.computed, budget_);
      const int32_t need = Need(s, s.held_blocks + alloc_[r], s.computed + n);
      if (need <= free_) {
        free_ -= need;
        alloc_[r] += need;
        d_.scheduled.push_back({{false, r}, n, 0});
        budget_ -= n;
        ++i;
        continue;
      }
      // Out of blocks: preempt the newest running sequence (possibly this one).
      const int32_t victim = running_.back();
      running_.pop_back();
      if (running_.empty()) {
        d_.failed.push_back(
            {{false, victim},
             absl::ResourceExhaustedError("the KV cache cannot hold this sequence")});
        break;
      }
      // Placement goes oldest first and preemption newest first, so a victim is this
      // sequence or one not placed yet: no budget is ever spent on a victim.
      free_ += snap_.running[victim].exclusive_blocks + alloc_[victim];
      alloc_[victim] = 0;
      d_.preempted.push_back(victim);
      // Retry the same index (it holds the same sequence unless that was the victim).
    }
  }

  enum class Outcome { kAdmitted, kSkipped, kFailed, kStop };

  void Admit() {
    InitTenants();
    // Preempted sequences wait ahead of the queue (the last one preempted first); they
    // hold nothing now and their prefix is not looked up again this step. Sequences
    // admitted before come next; the rest wait in their tenant's queue.
    std::vector<SeqRef> first;
    for (auto it = d_.preempted.rbegin(); it != d_.preempted.rend(); ++it) {
      first.push_back({false, *it});
    }
    std::vector<std::deque<int32_t>> queues(tenants_.size());
    for (int32_t w = 0; w < static_cast<int32_t>(snap_.waiting.size()); ++w) {
      if (snap_.waiting[w].started) {
        first.push_back({true, w});
      } else {
        queues[TenantOf(snap_.waiting[w])].push_back(w);
      }
    }
    for (const SeqRef& ref : first) {
      if (Try(ref, /*charge=*/false) == Outcome::kStop) return;
    }
    for (int32_t t = NextTenant(queues); t >= 0; t = NextTenant(queues)) {
      const int32_t w = queues[t].front();
      queues[t].pop_front();
      if (Try({true, w}, /*charge=*/true) == Outcome::kStop) return;
    }
  }

  void InitTenants() {
    tenants_ = snap_.tenants;
    if (tenants_.empty()) tenants_.emplace_back();
    for (TenantShare& t : tenants_) t.weight = std::max(1, t.weight);
    tenant_running_.assign(tenants_.size(), 0);
    for (int32_t r : running_) ++tenant_running_[TenantOf(snap_.running[r])];
    running_count_ = static_cast<int32_t>(running_.size());
  }

  int32_t TenantOf(const SeqSnapshot& s) const {
    return s.tenant >= 0 && s.tenant < static_cast<int32_t>(tenants_.size()) ? s.tenant : 0;
  }
  bool TenantFull(int32_t t) const {
    return tenants_[t].max_running > 0 && tenant_running_[t] >= tenants_[t].max_running;
  }

  // The waiting tenant with the lowest clock (ties: the earliest head), or -1.
  int32_t NextTenant(const std::vector<std::deque<int32_t>>& queues) const {
    int32_t best = -1;
    for (int32_t t = 0; t < static_cast<int32_t>(queues.size()); ++t) {
      if (queues[t].empty() || TenantFull(t)) continue;
      if (best < 0 || tenants_[t].service < tenants_[best].service ||
          (tenants_[t].service == tenants_[best].service &&
           queues[t].front() < queues[best].front())) {
        best = t;
      }
    }
    return best;
  }

  Outcome Try(const SeqRef& ref, bool charge) {
    if (budget_ <= 0 || running_count_ >= limits_.max_running) return Outcome::kStop;
    SeqSnapshot s = ref.waiting ? snap_.waiting[ref.index] : snap_.running[ref.index];
    const int32_t t = TenantOf(s);
    if (TenantFull(t)) return Outcome::kSkipped;
    int32_t prefix = 0, unreferenced = 0;
    if (ref.waiting) {
      prefix = s.prefix_blocks;
      unreferenced = s.prefix_unreferenced;
    } else {
      s.computed = 0;  // a victim starts over
    }
    const int32_t computed = std::max(s.computed, prefix * limits_.block_size);
    const int32_t n = std::min(s.total - computed, budget_);
    if (s.whole && n < s.total - computed) return Outcome::kStop;
    const int32_t cost = Need(s, prefix, computed + n) + unreferenced;
    if (cost > free_) {
      if (running_count_ > 0) return Outcome::kStop;  // wait for blocks to be freed
      d_.failed.push_back(
          {ref, absl::ResourceExhaustedError("the KV cache cannot hold this prompt")});
      return Outcome::kFailed;
    }
    free_ -= cost;
    d_.scheduled.push_back({ref, n, prefix});
    budget_ -= n;
    ++running_count_;
    ++tenant_running_[t];
    if (charge) {
      tenants_[t].service +=
          static_cast<double>(std::max(1, s.total - computed)) / tenants_[t].weight;
    }
    return Outcome::kAdmitted;
  }

  const Snapshot& snap_;
  const SchedulerLimits& limits_;
  int32_t free_;
  int32_t budget_;
  std::vector<int32_t> running_;         // snapshot indices still running, oldest first
  std::vector<int32_t> alloc_;           // blocks given to running[i] this step
  std::vector<TenantShare> tenants_;     // clocks charged as sequences are admitted
  std::vector<int32_t> tenant_running_;  // each tenant's sequences in the batch
  int32_t running_count_ = 0;
  Decision d_;
};

}  // namespace

Decision Schedule(const Snapshot& snapshot, const SchedulerLimits& limits) {
  return Planner(snapshot, limits).Run();
}

int32_t PriorityInsertIndex(absl::Span<const int32_t> waiting_priorities, int32_t priority) {
  const auto it = std::find_if(waiting_priorities.begin(), waiting_priorities.end(),
                               [&](int32_t p) { return p < priority; });
  return static_cast<int32_t>(it - waiting_priorities.begin());
}

absl::Status CheckQueue(bool accepting, const absl::Status& backend_health, int32_t queued,
                        int32_t max_waiting) {
  if (!accepting) return absl::UnavailableError("server is shutting down");
  if (!backend_health.ok()) {
    return absl::UnavailableError(
        absl::StrCat("the model backend failed (restart the server): ", backend_health.message()));
  }
  if (queued >= max_waiting) {
    return absl::ResourceExhaustedError(
        absl::StrCat("waiting queue is full (", max_waiting, " requests)"));
  }
  return absl::OkStatus();
}

}  // namespace superpose::engine
