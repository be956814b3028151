#include "server/private_mode.h"

#include <sys/prctl.h>
#include <sys/resource.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "engine/sequence/request.h"

namespace superpose::server {

absl::Status EnterPrivateMode() {
  const rlimit no_core{0, 0};
  if (setrlimit(RLIMIT_CORE, &no_core) != 0) {
    return absl::InternalError(absl::StrCat("setrlimit(RLIMIT_CORE, 0): ", std::strerror(errno)));
  }
  if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) {
    return absl::InternalError(absl::StrCat("prctl(PR_SET_DUMPABLE, 0): ", std::strerror(errno)));
  }
  if (!engine::HashRequestIdsInLogs()) {
    return absl::InternalError("no random key for hashing request ids (RAND_bytes failed)");
  }
  return absl::OkStatus();
}

std::string PrivateModeLine() {
  return "private mode: prefix cache off, RAG path cache off, KV blocks zeroed when freed, "
         "request ids hashed in logs, core dumps off";
}

}  // namespace superpose::server
