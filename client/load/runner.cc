#include "client/load/runner.h"

#include <unistd.h>

#include <cstdio>
#include <random>
#include <thread>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/load/connection.h"

namespace superpose::load {
namespace v1 = superpose::v1;
namespace {

using Clock = std::chrono::steady_clock;

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

// One streaming call (Generate or GenerateRag); deletes itself when done.
class Call : public grpc::ClientReadReactor<v1::GenerateResponse> {
 public:
  Call(const Settings& s, Runner* runner, Recorder* recorder, CallSpec spec)
      : runner_(runner), recorder_(recorder), spec_(std::move(spec)) {
    PrepareContext(s, spec_.affinity, &ctx_);
    outcome_.input_tokens = spec_.prompt_ids;
  }
  void Start(v1::Superpose::Stub* stub) {
    start_ = last_ = Clock::now();
    if (spec_.rag) {
      stub->async()->GenerateRag(&ctx_, &spec_.rag_request, this);
    } else {
      stub->async()->Generate(&ctx_, &spec_.generate, this);
    }
    StartRead(&resp_);
    StartCall();
  }
  void OnReadDone(bool ok) override {
    if (!ok) return;
    OnResponse();
    StartRead(&resp_);
  }
  void OnDone(const grpc::Status& status) override {
    outcome_.code = status.error_code();
    outcome_.e2e_ms = Ms(Clock::now() - start_);
    outcome_.decode_ms = first_ == Clock::time_point() ? 0 : Ms(last_ - first_);
    recorder_->Add(std::move(outcome_));
    Runner* runner = runner_;
    delete this;
    runner->CallDone();
  }

 private:
  void OnResponse() {
    const auto now = Clock::now();
    if (resp_.has_usage() && resp_.usage().has_prompt_tokens()) {
      outcome_.input_tokens = resp_.usage().prompt_tokens();
    }
    const int k = resp_.token_ids_size();
    if (k == 0) return;
    if (outcome_.ttft_ms < 0) {
      outcome_.ttft_ms = Ms(now - start_);
      first_ = now;
      // Further tokens merged into the first response arrived with it.
      for (int i = 1; i < k; ++i) outcome_.itl_ms.push_back(0);
    } else {
      const double gap = Ms(now - last_);
      for (int i = 0; i < k; ++i) outcome_.itl_ms.push_back(gap / k);
    }
    last_ = now;
    outcome_.output_tokens += k;
  }

  Runner* runner_;
  Recorder* recorder_;
  CallSpec spec_;
  grpc::ClientContext ctx_;
  v1::GenerateResponse resp_;
  Outcome outcome_;
  Clock::time_point start_, last_, first_;
};

// Prints the phase's progress on stderr every second (a line every 5 s when stderr is
// not a terminal) until destroyed.
class Progress {
 public:
  Progress(const Settings& s, const std::string& label, const Recorder& rec)
      : label_(label), rec_(rec), tty_(isatty(2) != 0) {
    if (s.progress) thread_ = std::thread([this] { Loop(); });
  }
  ~Progress() {
    {
      absl::MutexLock lock(&mu_);
      stop_ = true;
    }
    if (thread_.joinable()) thread_.join();
  }

 private:
  void Loop() {
    const auto t0 = Clock::now();
    int64_t last_tokens = 0;
    auto last = t0;
    for (int tick = 1;; ++tick) {
      {
        absl::MutexLock lock(&mu_);
        const auto stopped = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return stop_; };
        if (mu_.AwaitWithTimeout(absl::Condition(&stopped), absl::Seconds(1))) break;
      }
      if (!tty_ && tick % 5 != 0) continue;
      Print(t0, &last, &last_tokens);
    }
    Print(t0, &last, &last_tokens);
    if (tty_) std::fputc('\n', stderr);
  }
  void Print(Clock::time_point t0, Clock::time_point* last, int64_t* last_tokens) {
    const auto now = Clock::now();
    const int64_t tokens = rec_.output_tokens.load();
    const double dt = std::chrono::duration<double>(now - *last).count();
    const int64_t sent = rec_.sent.load(), done = rec_.done.load();
    std::fprintf(stderr,
                 "%s[%s] %5.1fs sent %lld done %lld errors %lld in flight %lld %.1f tok/s%s",
                 tty_ ? "\r" : "", label_.c_str(), std::chrono::duration<double>(now - t0).count(),
                 static_cast<long long>(sent), static_cast<long long>(done),
                 static_cast<long long>(rec_.errors.load()), static_cast<long long>(sent - done),
                 dt > 0 ? (tokens - *last_tokens) / dt : 0.0, tty_ ? "   " : "\n");
    std::fflush(stderr);
    *last = now;
    *last_tokens = tokens;
  }

  std::string label_;
  const Recorder& rec_;
  bool tty_;
  absl::Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace

Runner::Runner(const Settings& s, std::shared_ptr<grpc::Channel> channel, const Workload& workload)
    : s_(s),
      channel_(std::move(channel)),
      stub_(v1::Superpose::NewStub(channel_)),
      workload_(workload) {}

void Runner::CallDone() {
  absl::MutexLock lock(&mu_);
  --inflight_;
}

void Runner::Launch(uint64_t level_index, Recorder* recorder) {
  {
    absl::MutexLock lock(&mu_);
    ++inflight_;
  }
  recorder->sent.fetch_add(1);
  auto* call = new Call(s_, this, recorder, workload_.Make(next_index_++, level_index));
  call->Start(stub_.get());
}

bool Runner::WaitTurn(const Phase& phase, Clock::time_point due, Clock::time_point end) {
  const bool timed = phase.duration_s > 0;
  if (timed && due >= end) {
    std::this_thread::sleep_until(end);
    return false;
  }
  std::this_thread::sleep_until(due);
  const int cap = phase.open_loop ? s_.max_inflight : static_cast<int>(phase.level);
  if (cap <= 0) return true;
  absl::MutexLock lock(&mu_);
  const auto has_room = [this, cap]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return inflight_ < cap; };
  if (!timed) {
    mu_.Await(absl::Condition(&has_room));
    return true;
  }
  const absl::Time deadline =
      absl::Now() +
      absl::FromChrono(std::chrono::duration_cast<std::chrono::nanoseconds>(end - Clock::now()));
  return mu_.AwaitWithDeadline(absl::Condition(&has_room), deadline);
}

PhaseResult Runner::Run(const Phase& phase) {
  Recorder recorder;
  const auto start = Clock::now();
  const auto end = start + std::chrono::duration_cast<Clock::duration>(
                               std::chrono::duration<double>(phase.duration_s));
  {
    Progress progress(s_, phase.label, recorder);
    std::mt19937_64 rng(s_.seed * 7919 + static_cast<uint64_t>(phase.level * 1000));
    std::exponential_distribution<double> gap(phase.open_loop ? phase.level : 1.0);
    double arrival_s = 0;
    for (uint64_t i = 0; phase.requests == 0 || static_cast<int64_t>(i) < phase.requests; ++i) {
      if (phase.open_loop) arrival_s += gap(rng);
      const auto due = start + std::chrono::duration_cast<Clock::duration>(
                                   std::chrono::duration<double>(arrival_s));
      if (!WaitTurn(phase, due, end)) break;
      Launch(i, &recorder);
    }
    absl::MutexLock lock(&mu_);
    const auto idle = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return inflight_ == 0; };
    mu_.Await(absl::Condition(&idle));
  }
  PhaseResult r;
  r.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  r.outcomes = recorder.Take();
  return r;
}

}  // namespace superpose::load
