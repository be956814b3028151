// Shared helpers for tests: fixture paths, JSON reading, running an engine request to
// completion.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <memory>

#include "absl/synchronization/mutex.h"
#include "engine/backend.h"
#include "engine/runtime/engine.h"

namespace superpose::testing {

// SUPERPOSE_SHARED_DIR overrides the build-time path (binaries run on another machine,
// e.g. scripts/gpu-check.sh with prebuilt tests).
inline std::string SharedDir() {
  const char* env = std::getenv("SUPERPOSE_SHARED_DIR");
  return env != nullptr && env[0] != '\0' ? env : SP_SHARED_DIR;
}
inline std::string Stories260kDir() { return SharedDir() + "/fixtures/stories260k"; }

// Straight through a backend: a prefill of `prompt` (KV blocks 0, 1, ... of 16 slots),
// then `steps` decode steps of one token: the argmax of the previous logits, or
// forced[s] when `forced` is given (teacher forcing, so that backends with slightly
// different numerics see the same tokens). Returns every logits row.
inline std::vector<std::vector<float>> RunSteps(engine::Backend& b,
                                                const std::vector<int32_t>& prompt, int steps,
                                                const std::vector<int32_t>* forced = nullptr) {
  std::vector<std::vector<float>> rows;
  engine::BatchPlan plan;
  plan.seqs.resize(1);
  for (size_t i = 0; i < prompt.size(); ++i) {
    plan.tokens.push_back(prompt[i]);
    plan.positions.push_back(static_cast<float>(i));
    plan.kv_slots.push_back({static_cast<int32_t>(i / 16), static_cast<int32_t>(i % 16)});
  }
  plan.seqs[0].num_tokens = static_cast<int32_t>(prompt.size());
  plan.logits_for = {plan.seqs[0].num_tokens - 1};
  int32_t pos = static_cast<int32_t>(prompt.size());
  for (int s = 0; s <= steps; ++s) {
    engine::ForwardOutput out;
    const absl::Status st = b.Forward(plan, &out);
    if (!st.ok()) {
      ADD_FAILURE() << "step " << s << ": " << st;
      return rows;
    }
    rows.push_back(out.logits);
    const int32_t next =
        forced != nullptr
            ? (*forced)[s]
            : static_cast<int32_t>(std::max_element(out.logits.begin(), out.logits.end()) -
                                   out.logits.begin());
    plan.seqs[0].context.clear();
    for (int32_t done = 0, blk = 0; done < pos; ++blk) {
      const int32_t len = std::min(16, pos - done);
      plan.seqs[0].context.push_back({blk, 0, len});
      done += len;
    }
    plan.tokens = {next};
    plan.positions = {static_cast<float>(pos)};
    plan.kv_slots = {{pos / 16, pos % 16}};
    plan.seqs[0].num_tokens = 1;
    plan.logits_for = {0};
    ++pos;
  }
  return rows;
}

inline nlohmann::json ReadJson(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return nlohmann::json::parse(ss.str());
}

struct Completion {
  std::vector<int32_t> tokens;
  std::string text;
  std::vector<std::string> deltas;
  engine::FinishReason finish = engine::FinishReason::kNone;
  engine::Usage usage;
  absl::Status status;
  std::vector<engine::TokenLogprobs> logprobs;
  std::shared_ptr<const engine::rag::Result> rag;
};

// Collects the events of one request; Wait() blocks until the final event. The state
// is shared with the callback, so the Collector may be destroyed as soon as Wait()
// returns even while the engine thread is still leaving the callback.
class Collector {
 public:
  Collector() : state_(std::make_shared<State>()) {}
  engine::StreamCallback Callback() {
    return [state = state_](engine::StreamEvent&& ev) {
      absl::MutexLock lock(&state->mu);
      Completion& r = state->result;
      for (int32_t t : ev.token_ids) r.tokens.push_back(t);
      r.text += ev.text;
      if (!ev.text.empty()) r.deltas.push_back(ev.text);
      for (auto& lp : ev.logprobs) r.logprobs.push_back(lp);
      if (ev.finished) {
        r.finish = ev.finish_reason;
        r.usage = ev.usage;
        r.status = ev.status;
        r.rag = ev.rag;
        state->done = true;
      }
    };
  }
  const Completion& Wait() {
    absl::MutexLock lock(&state_->mu);
    state_->mu.Await(absl::Condition(&state_->done));
    return state_->result;
  }
  bool WaitFor(absl::Duration d) {
    absl::MutexLock lock(&state_->mu);
    return state_->mu.AwaitWithTimeout(absl::Condition(&state_->done), d);
  }

 private:
  struct State {
    absl::Mutex mu;
    bool done = false;
    Completion result;
  };
  std::shared_ptr<State> state_;
};

inline Completion RunRequest(engine::Engine& engine, engine::Request req) {
  Collector c;
  absl::StatusOr<uint64_t> h = engine.Submit(std::move(req), c.Callback());
  if (!h.ok()) {
    Completion r;
    r.status = h.status();
    return r;
  }
  return c.Wait();
}

// Submits every request before waiting for any (they share the engine's steps), then
// returns their completions in order.
inline std::vector<Completion> RunTogether(engine::Engine& engine,
                                           std::vector<engine::Request> reqs) {
  std::vector<Collector> collectors(reqs.size());
  std::vector<Completion> out(reqs.size());
  std::vector<bool> submitted(reqs.size());
  for (size_t i = 0; i < reqs.size(); ++i) {
    absl::StatusOr<uint64_t> h = engine.Submit(std::move(reqs[i]), collectors[i].Callback());
    submitted[i] = h.ok();
    if (!h.ok()) out[i].status = h.status();
  }
  for (size_t i = 0; i < reqs.size(); ++i) {
    if (submitted[i]) out[i] = collectors[i].Wait();
  }
  return out;
}

inline engine::Request GreedyRequest(std::vector<int32_t> prompt, int32_t max_new_tokens) {
  engine::Request r;
  r.request_id = "test";
  r.prompt_ids = std::move(prompt);
  r.sampling.temperature = 0.0f;
  r.sampling.max_new_tokens = max_new_tokens;
  r.ignore_eos = true;
  return r;
}

}  // namespace superpose::testing
