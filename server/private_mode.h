// Private mode (--private, the Private Cloud Compute stance): nothing about a request
// outlives it. The engine side (caches off, freed KV blocks zeroed) is
// EngineOptions::private_mode; this is the process side.
#pragma once

#include <string>

#include "absl/status/status.h"

namespace superpose::server {

// No core dumps (prctl(PR_SET_DUMPABLE, 0): no dump, no ptrace attach by other
// non-root processes, /proc/<pid>/mem closed to them; RLIMIT_CORE 0, soft and hard) and
// request ids hashed in log lines (engine::HashRequestIdsInLogs). Call at startup,
// before any request; INTERNAL when a step fails (the server must not start then).
absl::Status EnterPrivateMode();

// The startup line that says what private mode does.
std::string PrivateModeLine();

}  // namespace superpose::server
