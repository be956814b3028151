#include "engine/runtime/stop_checker.h"

#include <algorithm>

namespace superpose::engine {

StopChecker::StopChecker(std::vector<std::string> stops) {
  for (auto& s : stops) {
    if (!s.empty()) {
      max_len_ = std::max(max_len_, s.size());
      stops_.push_back(std::move(s));
    }
  }
}

std::string StopChecker::Append(const std::string& delta, bool* stopped) {
  *stopped = false;
  if (stops_.empty()) return delta;
  text_ += delta;
  // Earliest stop string that can start after the already-sent part minus overlap.
  const size_t search_from = sent_ >= max_len_ ? sent_ - max_len_ + 1 : 0;
  size_t best = std::string::npos;
  for (const std::string& s : stops_) {
    const size_t p = text_.find(s, search_from);
    if (p != std::string::npos && p < best) best = p;
  }
  if (best != std::string::npos) {
    *stopped = true;
    std::string out = best > sent_ ? text_.substr(sent_, best - sent_) : std::string();
    sent_ = text_.size();
    return out;
  }
  // Hold back the longest suffix that is a proper prefix of some stop string.
  size_t hold = 0;
  for (const std::string& s : stops_) {
    for (size_t k = std::min(s.size() - 1, text_.size()); k > hold; --k) {
      if (text_.compare(text_.size() - k, k, s, 0, k) == 0) {
        hold = k;
        break;
      }
    }
  }
  const size_t safe = std::max(sent_, text_.size() - hold);
  std::string out = text_.substr(sent_, safe - sent_);
  sent_ = safe;
  // Keep only the tail needed for matching.
  if (sent_ > max_len_) {
    const size_t drop = sent_ - max_len_;
    text_.erase(0, drop);
    sent_ -= drop;
  }
  return out;
}

std::string StopChecker::Flush() {
  std::string out = text_.substr(sent_);
  sent_ = text_.size();
  return out;
}

}  // namespace superpose::engine
