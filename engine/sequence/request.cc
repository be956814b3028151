#include "engine/sequence/request.h"

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

}  // namespace superpose::engine
