// Shared helpers for tests: fixture paths, JSON reading, running an engine request to
// completion.
#pragma once

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <memory>

#include "absl/synchronization/mutex.h"
#include "engine/runtime/engine.h"

namespace superpose::testing {

// SUPERPOSE_SHARED_DIR overrides the build-time path (binaries run on another machine,
// e.g. scripts/gpu-check.sh with prebuilt tests).
inline std::string SharedDir() {
  const char* env = std::getenv("SUPERPOSE_SHARED_DIR");
  return env != nullptr && env[0] != '\0' ? env : SP_SHARED_DIR;
}
inline std::string Stories260kDir() { return SharedDir() + "/fixtures/stories260k"; }

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
