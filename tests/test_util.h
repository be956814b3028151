// Shared helpers for tests: fixture paths, JSON reading, running an engine request to
// completion.
#pragma once

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/synchronization/notification.h"
#include "engine/runtime/engine.h"

namespace superpose::testing {

inline std::string SharedDir() { return SP_SHARED_DIR; }
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
};

// Collects the events of one request; Wait() blocks until the final event.
class Collector {
 public:
  engine::StreamCallback Callback() {
    return [this](engine::StreamEvent&& ev) {
      for (int32_t t : ev.token_ids) result_.tokens.push_back(t);
      result_.text += ev.text;
      if (!ev.text.empty()) result_.deltas.push_back(ev.text);
      for (auto& lp : ev.logprobs) result_.logprobs.push_back(lp);
      if (ev.finished) {
        result_.finish = ev.finish_reason;
        result_.usage = ev.usage;
        result_.status = ev.status;
        done_.Notify();
      }
    };
  }
  const Completion& Wait() {
    done_.WaitForNotification();
    return result_;
  }
  bool WaitFor(absl::Duration d) { return done_.WaitForNotificationWithTimeout(d); }

 private:
  Completion result_;
  absl::Notification done_;
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
