#include "engine/sequence/request.h"

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace superpose::engine {

const char* FinishReasonName(FinishReason f) {
  switch (f) {
    case FinishReason::kNone:
      return "none";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kEos:
      return "eos";
    case FinishReason::kCancelled:
      return "cancelled";
  }
  return "unknown";
}

absl::Status ValidateAdapterName(const std::string& name, const std::string& field) {
  if (name.empty() || name.size() > 64) {
    return absl::InvalidArgumentError(absl::StrCat(field, " must have 1 to 64 characters"));
  }
  for (char c : name) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.') {
      return absl::InvalidArgumentError(
          absl::StrCat(field, " may hold only letters, digits and - _ ."));
    }
  }
  return absl::OkStatus();
}

}  // namespace superpose::engine
