// Per-tenant limits and fair-share weights (docs/operations.md "Tenants"). The server
// reads them from the API key file (server/tenant_limits.h); the engine applies them:
// on Submit (priority cap, queue and in-flight token bounds) and in the scheduler
// (running bound, weight). Engine::SetTenantPolicies replaces them at run time.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>

#include "absl/status/status.h"

namespace superpose::engine {

struct TenantPolicy {
  int32_t max_running = 0;        // sequences in the running batch; 0: no bound
  int32_t max_queued = 0;         // requests waiting; 0: TenantPolicies::default_max_queued
  int64_t max_prompt_tokens = 0;  // prompt tokens in flight (queued + running); 0: no bound
  int32_t max_priority = 100;     // a request's priority is capped to it
  int32_t weight = 1;             // share of admitted prompt tokens under contention
};

struct TenantPolicies {
  std::map<std::string, TenantPolicy> tenants;  // by tenant name
  // The queue bound of tenants that set no max_queued (0: only the global bound).
  int32_t default_max_queued = 0;

  // The policy of `tenant` (defaults for a tenant not listed).
  const TenantPolicy& For(const std::string& tenant) const;
  // The queue bound of `tenant`, 0 when there is none.
  int32_t MaxQueued(const std::string& tenant) const;
};

// The checks of one tenant's new request on Submit, given what it has queued and in
// flight: RESOURCE_EXHAUSTED naming the tenant and the limit, with the retry hint
// `retry_after_ms` unless the request can never pass (a prompt larger than the tenant's
// max_prompt_tokens), or OK.
absl::Status CheckTenant(const std::string& tenant, const TenantPolicies& policies, int32_t queued,
                         int64_t tokens_in_flight, int64_t prompt_tokens, int64_t retry_after_ms);

// A refusal that the client may retry later carries a hint (milliseconds) as a status
// payload; the server turns it into the `retry-after-ms` trailing metadata.
inline constexpr char kRetryAfterMsPayload[] = "superpose.dev/retry-after-ms";
absl::Status WithRetryAfter(absl::Status status, int64_t ms);
std::optional<int64_t> RetryAfterMs(const absl::Status& status);

}  // namespace superpose::engine
