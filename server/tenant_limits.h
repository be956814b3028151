// Per-tenant limits of the API key file (docs/operations.md "Tenants"): a key line is
// '<key> <tenant> [name=value ...]' with the names below. The limits belong to the
// tenant: several keys of one tenant may each give them, but never with different
// values. The engine applies them (engine/runtime/tenant_policy.h).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "engine/runtime/tenant_policy.h"

namespace superpose::server {

class TenantLimitsBuilder {
 public:
  // Adds the tenant of line `line` of `path` and its name=value `fields`. Errors
  // (INVALID_ARGUMENT) name the file, the line and the field; never the key.
  absl::Status Add(const std::string& path, int line, const std::string& tenant,
                   absl::Span<const std::string> fields);
  // Every tenant added, with its limits (defaults where none were given).
  engine::TenantPolicies Build() const;

 private:
  absl::Status Set(const std::string& where, const std::string& tenant, const std::string& name,
                   int64_t value, int line);
  struct Entry {
    engine::TenantPolicy policy;
    std::map<std::string, std::pair<int64_t, int>> given;  // field -> (value, line)
  };
  std::map<std::string, Entry> tenants_;
};

// The policies the engine gets: those of the key file, with the queue bound of tenants
// that set no max_queued from --tenant_max_waiting (> 0: that bound; 0: none; < 0:
// automatic, half of --max_waiting when the file names several tenants, else none).
engine::TenantPolicies EnginePolicies(engine::TenantPolicies from_keys, int32_t tenant_max_waiting,
                                      int32_t max_waiting);

}  // namespace superpose::server
