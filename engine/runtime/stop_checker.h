// Stop strings over streamed text: holds back text that may still become a stop
// string, and truncates the output before the first stop string found.
#pragma once

#include <string>
#include <vector>

namespace superpose::engine {

class StopChecker {
 public:
  explicit StopChecker(std::vector<std::string> stops);
  // Appends newly decoded text. Returns the text that is now safe to send; sets
  // *stopped when a stop string was found (the returned text ends before it).
  std::string Append(const std::string& delta, bool* stopped);
  // At the end of generation: whatever was held back.
  std::string Flush();

 private:
  std::vector<std::string> stops_;
  size_t max_len_ = 0;
  std::string text_;  // output text not yet sent, plus a tail of sent text for matching
  size_t sent_ = 0;   // bytes of text_ already sent
};

}  // namespace superpose::engine
